"""Hugging Face weight files both ways, one tensor group at a time.

Reading: a family module supplies rules (``common.Rule``); ``converted_groups`` matches every
tensor in the files to a rule before reading any, so a missing, surplus-layer or mis-shaped tensor
is named up front, then yields the converted tensors rule by rule in their stored dtype.
Writing: ``hf_tensors`` runs the rules backwards and ``ShardedWriter`` writes safetensors shards
of at most ``max_shard_size`` bytes with the index transformers reads.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from jaxlm.config import ModelConfig
from jaxlm.io.hf.common import BUFFERS
from jaxlm.transformer import abstract_params

DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16), "float16": np.dtype(np.float16)}


def hf_weight_files(src) -> list[Path]:
    """The weight files of an HF model dir: safetensors (single or sharded) or pytorch_model.bin."""
    src = Path(src)
    for index, single in (("model.safetensors.index.json", "model.safetensors"),
                          ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        if (src / index).is_file():
            names = sorted(set(json.loads((src / index).read_text())["weight_map"].values()))
            missing = [n for n in names if not (src / n).is_file()]
            if missing:
                raise FileNotFoundError(f"{src / index} names {missing[0]}, which is not in {src}")
            return [src / n for n in names]
        if (src / single).is_file():
            return [src / single]
    raise FileNotFoundError(f"{src} holds no weights (model.safetensors or pytorch_model.bin)")


class HFWeights:
    """Random access to the tensors of an HF checkpoint by name, one array at a time, in its
    stored dtype (float32, bfloat16 or float16).

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
        self._int16 = torch.int16
        return list(state)

    def names(self) -> list[str]:
        return list(self._where)

    def get(self, name: str) -> np.ndarray:
        path = self._where[name]
        if path.suffix != ".safetensors":
            t = self._torch_state[name]
            if str(t.dtype) == "torch.bfloat16":  # numpy has no bfloat16: move the bits
                return t.view(dtype=self._int16).numpy().view(ml_dtypes.bfloat16)
            return t.numpy()
        with safe_open(str(path), framework="np") as f:
            return f.get_tensor(name)


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


def converted_groups(src, config: ModelConfig, family, log=None, dtype: str | None = None):
    """Yield flat {jaxlm name: array} dicts, one per rule, each complete over all layers.

    ``family``: the module of the checkpoint's model_type (``rules``, ``PREFIX``, ``SKIP``).
    ``dtype``: the parameters' dtype; None keeps each tensor's stored dtype.
    Only one group (e.g. the q/k/v kernels of every layer) is in memory at a time.
    """
    rules = family.rules(config)
    patterns = [r.pattern() for r in rules]
    expected = flatten(abstract_params(config))
    weights = HFWeights(src)

    # Match every tensor name to its rule first, so a missing weight fails before any reading.
    matched: dict[int, list] = {}
    ignored = []
    for name in weights.names():
        key = name[len(family.PREFIX):] if name.startswith(family.PREFIX) else name
        for i, pattern in enumerate(patterns):
            m = pattern.fullmatch(key)
            if m:
                groups = [g for g in m.groups() if g is not None]
                layer = int(groups[0]) if groups else None
                if layer is not None and layer >= config.n_layers:
                    raise ValueError(f"weight {name} is for layer {layer}, but the config has {config.n_layers} layers")
                matched.setdefault(i, []).append((name, layer))
                break
        else:
            if not (BUFFERS.search(key) or family.SKIP.search(key)):
                ignored.append(name)
    covered = {}
    for i, items in matched.items():
        for target, _ in rules[i].targets:
            covered.setdefault(target, set()).update(layer for _, layer in items)
    missing = [t for t in expected
               if covered.get(t) != (set(range(config.n_layers)) if t.startswith("layers.") else {None})]
    if missing:
        raise ValueError(f"{src}: checkpoint lacks weights for {', '.join(missing[:5])}"
                         + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    if ignored and log is not None:
        log(f"ignored {len(ignored)} tensors jaxlm does not use: {', '.join(ignored[:5])}")

    for i, items in sorted(matched.items()):
        rule = rules[i]
        out = {}
        for name, layer in items:
            w = weights.get(name)
            if tuple(w.shape) != tuple(rule.shape):
                raise ValueError(f"weight {name} has shape {tuple(w.shape)}, but the config implies {tuple(rule.shape)}")
            if dtype is not None:
                w = w.astype(DTYPES[dtype])
            for target, fn in rule.targets:
                value = fn(w)
                if target not in out:
                    out[target] = np.empty(expected[target].shape, value.dtype)
                out[target][... if layer is None else layer] = value
        if out:
            yield out


def hf_tensors(config: ModelConfig, family, read, *, bare: bool, dtype: str | None = None):
    """Yield (HF name, array) for every tensor of the model, rule by rule: ``read(path)`` gives a
    jaxlm parameter (stacked layout) as a numpy array; ``bare``: the architecture without a head
    module (its body tensors carry no prefix); ``dtype`` casts, None keeps each parameter's."""
    for rule in family.rules(config):
        if rule.to_hf is None:
            continue
        values = [read(path) for path, _ in rule.targets]
        prefix = "" if bare or rule.head else family.PREFIX
        for layer in range(config.n_layers) if rule.layered else [None]:
            pieces = values if layer is None else [v[layer] for v in values]
            w = np.ascontiguousarray(rule.to_hf(*pieces))
            if dtype is not None:
                w = w.astype(DTYPES[dtype])
            yield prefix + rule.name.format(layer), w
        del values


def parse_size(text) -> int:
    """'5GB', '500MB', '1.5GiB', '2048' (bytes) -> bytes, as transformers' max_shard_size."""
    if isinstance(text, int):
        return text
    units = {"": 1, "B": 1, "KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9, "TB": 10 ** 12,
             "KIB": 2 ** 10, "MIB": 2 ** 20, "GIB": 2 ** 30, "TIB": 2 ** 40}
    t = str(text).strip().upper()
    number = t.rstrip("KMGTIB")
    unit = t[len(number):]
    try:
        size = float(number) * units[unit]
    except (ValueError, KeyError):
        raise ValueError(f"--max-shard-size={text!r} is not a size; write e.g. 5GB, 500MB or 2GiB") from None
    if size < 1:
        raise ValueError(f"--max-shard-size={text!r} must be positive")
    return int(size)


class ShardedWriter:
    """Safetensors shards of at most ``max_bytes`` each (a larger tensor gets a shard of its own),
    written as tensors arrive; ``close`` names them as transformers does and writes the index."""

    def __init__(self, directory: Path, max_bytes: int):
        self.directory, self.max_bytes = Path(directory), max_bytes
        self.shards: list[list[str]] = []
        self.pending: dict[str, np.ndarray] = {}
        self.pending_bytes = self.total = 0

    def add(self, name: str, array: np.ndarray) -> None:
        if self.pending and self.pending_bytes + array.nbytes > self.max_bytes:
            self._flush()
        self.pending[name] = array
        self.pending_bytes += array.nbytes
        self.total += array.nbytes

    def _flush(self) -> None:
        save_file(self.pending, str(self.directory / f".shard-{len(self.shards)}.safetensors"), metadata={"format": "pt"})
        self.shards.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> list[str]:
        """Finish; returns the file names written."""
        if self.pending or not self.shards:
            self._flush()
        n = len(self.shards)
        if n == 1:
            os.replace(self.directory / ".shard-0.safetensors", self.directory / "model.safetensors")
            return ["model.safetensors"]
        names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        for i, name in enumerate(names):
            os.replace(self.directory / f".shard-{i}.safetensors", self.directory / name)
        weight_map = {t: names[i] for i, shard in enumerate(self.shards) for t in shard}
        (self.directory / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2) + "\n")
        return [*names, "model.safetensors.index.json"]
