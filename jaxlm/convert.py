"""Hugging Face checkpoints -> jaxlm parameters, streaming one tensor at a time.

Each family is a table of rules: an HF tensor name pattern, the shape the config implies for it, and
where its (transposed / split / reshaped) pieces go in jaxlm's tree. GPT-2 stores Conv1D weights
as [in, out]; BERT's Linear weights are [out, in]. Tied output matrices are absent from HF files and
need no entry; buffers such as ``position_ids`` or GPT-2's ``attn.bias`` mask are skipped.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable

import numpy as np

from jaxlm.config import ModelConfig
from jaxlm.tokenizer import TOKENIZER_FILES

Rule = tuple[str, tuple, list[tuple[str, Callable]]]

# HF tensors that are buffers or heads jaxlm does not model (BERT's next-sentence head).
_SKIP = re.compile(r"(^|\.)(position_ids|attn\.bias|attn\.masked_bias)$|^cls\.seq_relationship\.")


def read_hf_config(src) -> dict:
    src = Path(src)
    if not src.exists():
        raise FileNotFoundError(f"{src} does not exist")
    if not (src / "config.json").is_file():
        raise FileNotFoundError(f"{src} holds no model: config.json not found")
    return json.loads((src / "config.json").read_text())


def is_hf_dir(path) -> bool:
    p = Path(path, "config.json")
    return p.is_file() and "model_type" in json.loads(p.read_text())


def hf_weight_files(src) -> list[Path]:
    """The weight files of an HF model dir: safetensors (single or sharded) or pytorch_model.bin."""
    src = Path(src)
    index = src / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [src / n for n in names]
    if (src / "model.safetensors").is_file():
        return [src / "model.safetensors"]
    index = src / "pytorch_model.bin.index.json"
    if index.is_file():
        return [src / n for n in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    if (src / "pytorch_model.bin").is_file():
        return [src / "pytorch_model.bin"]
    raise FileNotFoundError(f"{src} holds no weights (model.safetensors or pytorch_model.bin)")


class HFWeights:
    """Random access to the tensors of an HF checkpoint by name, one float32 array at a time.

    Each safetensors read opens and closes the file, so memory-mapped pages are not kept resident.
    """

    def __init__(self, src):
        self._where: dict[str, Path] = {}
        self._torch_state = None
        for path in hf_weight_files(src):
            if path.suffix == ".safetensors":
                from safetensors import safe_open

                with safe_open(str(path), framework="np") as f:
                    self._where.update(dict.fromkeys(f.keys(), path))
            else:
                self._where.update(dict.fromkeys(self._load_torch(path), path))

    def _load_torch(self, path):
        try:
            import torch
        except ImportError:
            raise RuntimeError(
                f"{path.name} is a PyTorch pickle and torch is not installed; "
                "install jaxlm[hf] or save the model as safetensors") from None
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        self._torch_state = {**(self._torch_state or {}), **state}
        return list(state)

    def names(self) -> list[str]:
        return list(self._where)

    def get(self, name: str) -> np.ndarray:
        path = self._where[name]
        if path.suffix != ".safetensors":
            return self._torch_state[name].float().numpy()
        from safetensors import safe_open

        with safe_open(str(path), framework="np") as f:
            return np.asarray(f.get_tensor(name), np.float32)


def _t(w):
    return np.ascontiguousarray(w.T)


def _gpt2_rules(c: ModelConfig) -> list[Rule]:
    D, H, Dh, F, V, P = c.d_model, c.n_heads, c.dim_per_head, c.mlp_dim, c.vocab_size, c.max_len
    L = r"h\.(\d+)\."
    blk = "layers.blocks."
    qkv_w = [(f"{blk}attn.{n}.kernel", lambda w, j=j: w[:, j * D:(j + 1) * D].reshape(D, H, Dh))
             for j, n in enumerate("qkv")]
    qkv_b = [(f"{blk}attn.{n}.bias", lambda b, j=j: b[j * D:(j + 1) * D].reshape(H, Dh))
             for j, n in enumerate("qkv")]
    ident = lambda x: x  # noqa: E731
    rules = [
        (r"wte\.weight", (V, D), [("embed.tokens.embedding", ident)]),
        (r"wpe\.weight", (P, D), [("embed.positions.embedding", ident)]),
        (L + r"ln_1\.weight", (D,), [(blk + "attn_norm.scale", ident)]),
        (L + r"ln_1\.bias", (D,), [(blk + "attn_norm.bias", ident)]),
        (L + r"attn\.c_attn\.weight", (D, 3 * D), qkv_w),
        (L + r"attn\.c_attn\.bias", (3 * D,), qkv_b),
        (L + r"attn\.c_proj\.weight", (D, D), [(blk + "attn.o.kernel", lambda w: w.reshape(H, Dh, D))]),
        (L + r"attn\.c_proj\.bias", (D,), [(blk + "attn.o.bias", ident)]),
        (L + r"ln_2\.weight", (D,), [(blk + "mlp_norm.scale", ident)]),
        (L + r"ln_2\.bias", (D,), [(blk + "mlp_norm.bias", ident)]),
        (L + r"mlp\.c_fc\.weight", (D, F), [(blk + "mlp.up.kernel", ident)]),
        (L + r"mlp\.c_fc\.bias", (F,), [(blk + "mlp.up.bias", ident)]),
        (L + r"mlp\.c_proj\.weight", (F, D), [(blk + "mlp.down.kernel", ident)]),
        (L + r"mlp\.c_proj\.bias", (D,), [(blk + "mlp.down.bias", ident)]),
        (r"ln_f\.weight", (D,), [("final_norm.scale", ident)]),
        (r"ln_f\.bias", (D,), [("final_norm.bias", ident)]),
    ]
    # A tied lm_head.weight (some files carry it) is the token embedding again: skip it.
    rules.append((r"lm_head\.weight", (V, D), [] if c.tie_embeddings else [("lm_head.kernel", _t)]))
    return rules


def _bert_rules(c: ModelConfig) -> list[Rule]:
    D, H, Dh, F, V, P = c.d_model, c.n_heads, c.dim_per_head, c.mlp_dim, c.vocab_size, c.max_len
    L = r"encoder\.layer\.(\d+)\."
    blk = "layers.blocks."
    ident = lambda x: x  # noqa: E731
    norm = lambda hf, ours: [  # noqa: E731  (old checkpoints say gamma/beta)
        (hf + r"\.(?:weight|gamma)", (D,), [(ours + ".scale", ident)]),
        (hf + r"\.(?:bias|beta)", (D,), [(ours + ".bias", ident)]),
    ]
    rules = [
        (r"embeddings\.word_embeddings\.weight", (V, D), [("embed.tokens.embedding", ident)]),
        (r"embeddings\.position_embeddings\.weight", (P, D), [("embed.positions.embedding", ident)]),
        (r"embeddings\.token_type_embeddings\.weight", (c.type_vocab_size, D), [("embed.types.embedding", ident)]),
        *norm(r"embeddings\.LayerNorm", "embed.norm"),
        *[(L + rf"attention\.self\.{hf}\.weight", (D, D), [(f"{blk}attn.{n}.kernel", lambda w: _t(w).reshape(D, H, Dh))])
          for hf, n in (("query", "q"), ("key", "k"), ("value", "v"))],
        *[(L + rf"attention\.self\.{hf}\.bias", (D,), [(f"{blk}attn.{n}.bias", lambda b: b.reshape(H, Dh))])
          for hf, n in (("query", "q"), ("key", "k"), ("value", "v"))],
        (L + r"attention\.output\.dense\.weight", (D, D), [(blk + "attn.o.kernel", lambda w: _t(w).reshape(H, Dh, D))]),
        (L + r"attention\.output\.dense\.bias", (D,), [(blk + "attn.o.bias", ident)]),
        *norm(L + r"attention\.output\.LayerNorm", blk + "attn_norm"),
        (L + r"intermediate\.dense\.weight", (F, D), [(blk + "mlp.up.kernel", _t)]),
        (L + r"intermediate\.dense\.bias", (F,), [(blk + "mlp.up.bias", ident)]),
        (L + r"output\.dense\.weight", (D, F), [(blk + "mlp.down.kernel", _t)]),
        (L + r"output\.dense\.bias", (D,), [(blk + "mlp.down.bias", ident)]),
        *norm(L + r"output\.LayerNorm", blk + "mlp_norm"),
    ]
    if c.pooler:
        rules += [(r"pooler\.dense\.weight", (D, D), [("pooler.kernel", _t)]),
                  (r"pooler\.dense\.bias", (D,), [("pooler.bias", ident)])]
    if c.head == "mlm":
        rules += [
            (r"cls\.predictions\.transform\.dense\.weight", (D, D), [("mlm.transform.kernel", _t)]),
            (r"cls\.predictions\.transform\.dense\.bias", (D,), [("mlm.transform.bias", ident)]),
            *norm(r"cls\.predictions\.transform\.LayerNorm", "mlm.norm"),
            # The decoder bias is the same tensor as cls.predictions.bias; either fills it.
            (r"cls\.predictions\.(?:decoder\.)?bias", (V,), [("mlm.bias", ident)]),
            (r"cls\.predictions\.decoder\.weight", (V, D), [] if c.tie_embeddings else [("mlm.decoder.kernel", _t)]),
        ]
    if c.head == "classify":
        rules += [(r"classifier\.weight", (c.num_labels, D), [("classifier.kernel", _t)]),
                  (r"classifier\.bias", (c.num_labels,), [("classifier.bias", ident)])]
    return rules


_FAMILIES = {"gpt2": (_gpt2_rules, "transformer."), "bert": (_bert_rules, "bert.")}


def _flatten(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def _unflatten(flat):
    tree = {}
    for name, v in flat.items():
        *parents, leaf = name.split(".")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return tree


def _converted_groups(src, config: ModelConfig, log=None):
    """Yield flat {jaxlm name: array} dicts, one per rule, each complete over all layers.

    Only one group (e.g. the q/k/v kernels of every layer) is in memory at a time.
    """
    from jaxlm.transformer import abstract_params

    model_type = read_hf_config(src)["model_type"]
    rules_fn, prefix = _FAMILIES[model_type]
    rules = [(re.compile(p), shape, targets) for p, shape, targets in rules_fn(config)]
    expected = _flatten(abstract_params(config))
    weights = HFWeights(src)

    # Match every tensor name to its rule first, so a missing weight fails before any reading.
    matched: dict[int, list] = {}
    ignored = []
    for name in weights.names():
        key = name[len(prefix):] if name.startswith(prefix) else name
        for i, (pattern, _, _) in enumerate(rules):
            m = pattern.fullmatch(key)
            if m:
                layer = int(m.group(1)) if m.groups() else None
                if layer is not None and layer >= config.n_layers:
                    raise ValueError(f"weight {name} is for layer {layer}, but the config has {config.n_layers} layers")
                matched.setdefault(i, []).append((name, layer))
                break
        else:
            if not _SKIP.search(key):
                ignored.append(name)
    covered = {}
    for i, items in matched.items():
        for target, _ in rules[i][2]:
            covered.setdefault(target, set()).update(layer for _, layer in items)
    missing = [t for t in expected
               if covered.get(t) != (set(range(config.n_layers)) if t.startswith("layers.") else {None})]
    if missing:
        raise ValueError(f"{src}: checkpoint lacks weights for {', '.join(missing[:5])}"
                         + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    if ignored and log is not None:
        log(f"ignored {len(ignored)} tensors jaxlm does not use: {', '.join(ignored[:5])}")

    for i, items in sorted(matched.items()):
        _, shape, targets = rules[i]
        out = {t: np.empty(expected[t].shape, np.float32) for t, _ in targets}
        for name, layer in items:
            w = weights.get(name)
            if tuple(w.shape) != tuple(shape):
                raise ValueError(f"weight {name} has shape {tuple(w.shape)}, but the config implies {tuple(shape)}")
            for target, fn in targets:
                out[target][... if layer is None else layer] = fn(w)
        if out:
            yield out


def hf_to_params(src, config: ModelConfig | None = None, log=None):
    """(config, params) from an HF model dir. params: pure dict of float32 numpy arrays."""
    config = config or ModelConfig.from_hf(read_hf_config(src))
    flat = {}
    for group in _converted_groups(src, config, log):
        flat.update(group)
    return config, _unflatten(flat)


def convert(src, dst, *, overwrite: bool = False, log=None) -> Path:
    """HF model dir -> jaxlm model dir (config.json, params/, tokenizer files)."""
    from jaxlm.checkpoint import StreamingParamWriter, atomic_dir, write_config
    from jaxlm.tokenizer import copy_tokenizer_files  # noqa: F401

    hf = read_hf_config(src)
    config = ModelConfig.from_hf(hf)
    # Refuse a non-empty DST before the (long) read.
    with atomic_dir(dst, overwrite) as tmp:
        # Stream: one group of tensors in memory at a time (peak ~ one copy of the largest matrix).
        writer = StreamingParamWriter(tmp / "params")
        for group in _converted_groups(src, config, log):
            writer.write(_unflatten(group))
        writer.finalize()
        write_config(tmp, config)
        copied = copy_tokenizer_files(src, tmp)
        if log is not None:
            log(f"converted {src} ({hf.get('architectures', [hf['model_type']])[0]}) -> {dst}"
                f" with tokenizer files: {', '.join(copied) or 'none'}")
    return Path(dst)



def local_dir(path) -> Path:
    """``path`` itself if it exists, else a Hugging Face hub id fetched into the local cache."""
    p = Path(path)
    if p.exists():
        if not p.is_dir():
            raise NotADirectoryError(f"{p} is a file; expected a model directory")
        return p
    if p.is_absolute() or str(path).startswith(".") or str(path).count("/") > 1:
        raise FileNotFoundError(f"{path} does not exist")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(path), allow_patterns=[
            "config.json", "*.safetensors", "*.safetensors.index.json", *TOKENIZER_FILES]))
    except Exception as e:  # no hub client, no network, unknown repo
        raise FileNotFoundError(
            f"{path} is not a local directory and could not be fetched from the Hugging Face hub"
            f" ({type(e).__name__})") from None
