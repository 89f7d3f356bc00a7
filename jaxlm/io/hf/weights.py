"""Hugging Face weight files both ways, one tensor group at a time.

Reading: a family module supplies rules (``common.Rule``); ``converted_tensors`` matches every
tensor in the files to a rule before reading any, so a missing, surplus-layer or mis-shaped tensor
is named up front, then yields the parameters one layer's tensor at a time in their stored dtype.
Writing: ``export_plan`` runs the rules backwards and ``write_safetensors`` writes shards of at
most ``max_shard_size`` bytes, and the index transformers reads, computing one tensor at a time.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open

from jaxlm.config import ModelConfig
from jaxlm.io.hf.common import BUFFERS

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
                with _opened(path) as f:
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
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # torch raises RuntimeError / UnpicklingError / EOFError on damaged files
            raise ValueError(f"{path} is damaged or not a PyTorch checkpoint ({str(e).splitlines()[0]})") from None
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
        with _opened(path) as f:
            try:
                return f.get_tensor(name)
            except SafetensorError as e:
                raise ValueError(f"{path} is damaged: tensor {name} cannot be read ({e})") from None


@contextlib.contextmanager
def _opened(path: Path):
    """safe_open(path), with a damaged file (truncated, a broken header) named in one line.
    safetensors checks the header and that the tensors cover the file exactly; it keeps no checksum
    of the data, so a flipped byte inside a tensor goes unnoticed (as in transformers)."""
    try:
        f = safe_open(str(path), framework="np")
    except SafetensorError as e:
        raise ValueError(f"{path} is damaged or not a safetensors file ({e})") from None
    with f:
        yield f


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


def converted_tensors(src, config: ModelConfig, family, log=None, dtype: str | None = None):
    """Yield (jaxlm parameter path, array) for every parameter of the model, one layer's tensor at
    a time: "layers.blocks.<i>. ..." for the blocks (the per-layer layout), in the stored dtype
    unless ``dtype`` (float32, bfloat16, float16) says otherwise.

    ``family``: the module of the checkpoint's model_type (``rules``, ``PREFIX``, ``SKIP``).
    Every tensor is matched to its rule, and every parameter to its tensors, before any is read.
    """
    rules = family.rules(config)
    patterns = [r.pattern() for r in rules]
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
    missing = []  # HF tensors a parameter needs that no file holds, named as the family names them
    for i, rule in enumerate(rules):
        if rule.targets:
            have = {layer for _, layer in matched.get(i, [])}
            missing += [rule.name.format(layer) for layer in (range(config.n_layers) if rule.layered else [None])
                        if layer not in have]
    if missing:
        raise ValueError(f"{src}: checkpoint lacks {', '.join(missing[:5])}"
                         + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    if ignored and log is not None:
        log(f"ignored {len(ignored)} tensors jaxlm does not use: {', '.join(ignored[:5])}")

    for i, items in sorted(matched.items()):
        rule = rules[i]
        for name, layer in sorted(items, key=lambda item: (item[1] is not None, item[1] or 0)):
            w = weights.get(name)
            if tuple(w.shape) != tuple(rule.shape):
                raise ValueError(f"weight {name} has shape {tuple(w.shape)}, but the config implies {tuple(rule.shape)}")
            if dtype is not None:
                w = w.astype(DTYPES[dtype])
            for target, fn in rule.targets:
                yield layer_path(target, layer), fn(w)


def layer_path(path: str, layer: int | None) -> str:
    """A block parameter's path in the per-layer layout ("layers.blocks.attn.q.kernel", 3 ->
    "layers.blocks.3.attn.q.kernel"); other paths as they are."""
    if layer is None:
        return path
    return path.replace("layers.blocks.", f"layers.blocks.{layer}.", 1)


def export_plan(config: ModelConfig, family, read, dtype_of, *, bare: bool, dtype: str | None = None):
    """[(HF name, shape, dtype, make)] for every tensor of the model, layer by layer: ``make()``
    computes the array. ``read(path)`` gives a parameter in the per-layer layout (see
    ``layer_path``) as a numpy array, ``dtype_of(path)`` its dtype without reading it; ``bare``:
    the architecture without a head module (its body tensors carry no prefix); ``dtype`` casts.
    """
    plan = []
    rules = [r for r in family.rules(config) if r.to_hf is not None]
    # Layer by layer (as transformers orders a state dict), so a reader can hold one layer at a time.
    first = next((i for i, r in enumerate(rules) if r.layered), len(rules))
    layered = [(r, layer) for layer in range(config.n_layers) for r in rules if r.layered]
    order = [(r, None) for r in rules[:first]] + layered + [(r, None) for r in rules[first:] if not r.layered]
    for rule, layer in order:
        prefix = "" if bare or rule.head else family.PREFIX
        paths = [layer_path(path, layer) for path, _ in rule.targets]
        out = DTYPES[dtype] if dtype is not None else np.dtype(dtype_of(paths[0]))

        def make(paths=paths, rule=rule, out=out):
            return np.ascontiguousarray(rule.to_hf(*[np.asarray(read(p)) for p in paths])).astype(out, copy=False)

        plan.append((prefix + rule.name.format(layer), tuple(rule.shape), out, make))
    return plan


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


_ST_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16", "int8": "I8", "int32": "I32", "int64": "I64"}


def write_safetensors(directory, plan, max_bytes: int) -> list[str]:
    """Write ``plan`` (``export_plan``) as safetensors files of at most ``max_bytes`` of tensor data
    each (a larger tensor gets a file of its own), named and indexed as transformers does; returns
    the file names.

    Written by hand (the format is an 8-byte header length, a JSON header of names, dtypes, shapes
    and byte offsets, then the bytes), because safetensors' own writer takes a whole dict of
    arrays at once: here every header is known from the plan before any tensor is computed, so
    one tensor at a time is in memory, whatever the model's size.
    """
    directory = Path(directory)
    shards: list[list] = []
    size = 0
    for entry in plan:
        nbytes = int(np.prod(entry[1], dtype=np.int64)) * entry[2].itemsize
        if not shards or (size and size + nbytes > max_bytes):
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes
    n = len(shards)
    names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    total = 0
    for fname, shard in zip(names, shards):
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, shape, dt, _ in shard:
            nbytes = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
            header[name] = {"dtype": _ST_DTYPES[dt.name], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
        with open(directory / fname, "wb") as f:
            f.write(len(text).to_bytes(8, "little") + text)
            for name, shape, dt, make in shard:
                array = make()
                if array.shape != tuple(shape) or array.dtype != dt:
                    raise RuntimeError(f"{name}: made {array.dtype}{array.shape}, planned {dt}{tuple(shape)}")
                f.write(array.tobytes())
        total += offset
    if n > 1:
        weight_map = {entry[0]: fname for fname, shard in zip(names, shards) for entry in shard}
        (directory / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2) + "\n")
        names.append("model.safetensors.index.json")
    return names
