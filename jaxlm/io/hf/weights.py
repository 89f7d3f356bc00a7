"""Reading Hugging Face weight files and turning them into jaxlm parameters, one group at a time.

A family module supplies rules (see ``common.Rule``); ``converted_groups`` matches every tensor in
the files to a rule before reading any, so a missing, surplus-layer or mis-shaped tensor is named
up front, then yields the converted tensors rule by rule: peak memory is about one group.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
from safetensors import safe_open

from jaxlm.config import ModelConfig
from jaxlm.io.hf.common import BUFFERS
from jaxlm.transformer import abstract_params


def hf_weight_files(src) -> list[Path]:
    """The weight files of an HF model dir: safetensors (single or sharded) or pytorch_model.bin."""
    src = Path(src)
    for index, single in (("model.safetensors.index.json", "model.safetensors"),
                          ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        if (src / index).is_file():
            return [src / n for n in sorted(set(json.loads((src / index).read_text())["weight_map"].values()))]
        if (src / single).is_file():
            return [src / single]
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
                with safe_open(str(path), framework="np") as f:
                    self._where.update(dict.fromkeys(f.keys(), path))
            else:
                self._where.update(dict.fromkeys(self._load_torch(path), path))

    def _load_torch(self, path):
        try:
            import torch  # heavy and optional (the hf extra): only for PyTorch pickles
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
        with safe_open(str(path), framework="np") as f:
            return np.asarray(f.get_tensor(name), np.float32)


def flatten(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def unflatten(flat):
    tree = {}
    for name, v in flat.items():
        *parents, leaf = name.split(".")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return tree


def converted_groups(src, config: ModelConfig, family, log=None):
    """Yield flat {jaxlm name: array} dicts, one per rule, each complete over all layers.

    ``family``: the module of the checkpoint's model_type (``rules``, ``PREFIX``, ``SKIP``).
    Only one group (e.g. the q/k/v kernels of every layer) is in memory at a time.
    """
    rules = [(re.compile(p), shape, targets) for p, shape, targets in family.rules(config)]
    expected = flatten(abstract_params(config))
    weights = HFWeights(src)

    # Match every tensor name to its rule first, so a missing weight fails before any reading.
    matched: dict[int, list] = {}
    ignored = []
    for name in weights.names():
        key = name[len(family.PREFIX):] if name.startswith(family.PREFIX) else name
        for i, (pattern, _, _) in enumerate(rules):
            m = pattern.fullmatch(key)
            if m:
                layer = int(m.group(1)) if m.groups() else None
                if layer is not None and layer >= config.n_layers:
                    raise ValueError(f"weight {name} is for layer {layer}, but the config has {config.n_layers} layers")
                matched.setdefault(i, []).append((name, layer))
                break
        else:
            if not (BUFFERS.search(key) or family.SKIP.search(key)):
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
