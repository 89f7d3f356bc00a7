"""jaxlm model directories: ``config.json`` (the ModelConfig), orbax ``params/``, tokenizer files.

Writes are atomic (``atomic.atomic_dir``): everything goes to a hidden sibling directory that is
renamed into place only once complete and flushed, so a failure never leaves a half-written
destination or touches an existing one. ``checksums.json`` records every file's SHA-256; reading
the directory checks them first, so damage from a copy is named, never loaded. Parameters are stored one block per layer (``layers/blocks/<i>/...``),
so conversions write and read them a layer at a time; directories written stacked (a leading
layers axis) by earlier versions read the same. Each array keeps the dtype it was stored in.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import orbax.checkpoint.experimental.v1 as ocp

from jaxlm.config import ModelConfig
from jaxlm.io import checksums
from jaxlm.io.atomic import atomic_dir
from jaxlm.tokenizer import load_tokenizer
from jaxlm.transformer import abstract_params, unstack_layers

FORMAT = "jaxlm-model-v1"


def is_model_dir(path) -> bool:
    p = Path(path, "config.json")
    return p.is_file() and json.loads(p.read_text()).get("format") == FORMAT


def save_params(path, params) -> None:
    """Write a pytree of arrays (numpy or jax) as an orbax checkpoint at ``path`` (must not exist)."""
    ocp.save(Path(path).absolute(), storage_keys(params))


class StreamingParamWriter:
    """Write a param tree piece by piece (orbax partial saves), holding one piece in memory at a time."""

    def __init__(self, path):
        self.path = Path(path).absolute()

    def write(self, subtree: dict) -> None:
        ocp.partial.save(self.path, storage_keys(subtree))

    def finalize(self) -> None:
        ocp.partial.finalize(self.path)


def storage_keys(tree):
    """Layer indices as strings, as orbax names them on disk."""
    return {str(k): storage_keys(v) for k, v in tree.items()} if isinstance(tree, dict) else tree


def memory_keys(tree):
    """Layer indices back to ints (the per-layer layout ``transformer.unstack_layers`` makes)."""
    if not isinstance(tree, dict):
        return tree
    return {(int(k) if isinstance(k, str) and k.isdigit() else k): memory_keys(v) for k, v in tree.items()}


def restore_params(path, abstract):
    """Read an orbax param tree shaped like ``abstract`` (ShapeDtypeStructs of the stacked layout)
    onto the first local device, in whichever layout it was stored, each leaf in its stored dtype."""
    path = Path(path).absolute()
    stored = ocp.metadata(path).metadata
    blocks = stored.get("layers", {}).get("blocks", {})
    if blocks and all(str(k).isdigit() for k in blocks):
        abstract = unstack_layers(abstract, len(blocks))  # ShapeDtypeStructs, sliced per layer
    abstract = storage_keys(abstract)
    _check_tree(stored, abstract)
    one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    dtypes = {jax.tree_util.keystr(k): m.dtype for k, m in jax.tree_util.tree_leaves_with_path(stored)}
    target = jax.tree_util.tree_map_with_path(
        lambda k, a: jax.ShapeDtypeStruct(a.shape, dtypes.get(jax.tree_util.keystr(k), a.dtype), sharding=one),
        abstract)
    return memory_keys(ocp.load(path, target))


def read_param(path, name: str, stored=None):
    """One parameter of an orbax param tree (``name``: its dotted path, e.g. "embed.tokens.embedding"
    or "layers.blocks.3.attn.q.kernel"), or the subtree under a path ("layers.blocks.3": one layer),
    read alone: the other leaves stay on disk. ``stored``: the
    tree's ``stored_metadata``, when reading many (reading it is half the cost)."""
    path = Path(path).absolute()
    one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    keys = tuple(name.split("."))

    def target(k, m):
        here = tuple(str(getattr(p, "key", p)) for p in k)
        return jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one) if here[:len(keys)] == keys else ocp.PLACEHOLDER

    stored = stored_metadata(path) if stored is None else stored
    tree = ocp.load(path, jax.tree_util.tree_map_with_path(target, stored))
    for k in keys:
        tree = tree[k]
    return tree


def stored_metadata(path):
    """The orbax metadata tree of a param tree (shapes and dtypes), for read_param / param_metadata."""
    return ocp.metadata(Path(path).absolute()).metadata


def param_metadata(path, stored=None) -> dict:
    """{dotted path: (shape, dtype)} of every stored parameter, read from the metadata only."""
    stored = stored_metadata(path) if stored is None else stored
    return {".".join(str(getattr(p, "key", p)) for p in k): (tuple(m.shape), m.dtype)
            for k, m in jax.tree_util.tree_leaves_with_path(stored)}


def _check_tree(stored, abstract) -> None:
    """Name the first tensor whose presence or shape differs between a checkpoint and the config."""
    flat_s = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(stored)}
    flat_a = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(abstract)}
    for name, a in flat_a.items():
        if name not in flat_s:
            raise ValueError(f"checkpoint has no tensor {name} that the config needs")
        shape = tuple(getattr(flat_s[name], "shape", ()))
        if shape != tuple(a.shape):
            raise ValueError(f"checkpoint tensor {name} has shape {shape}, the config expects {tuple(a.shape)}")


def save_model(dst, config: ModelConfig, params, tokenizer=None, *, overwrite: bool = False) -> Path:
    """Write a jaxlm model directory atomically. ``params``: pure dict of arrays, either layout."""
    with atomic_dir(dst, overwrite, seal=True) as tmp:
        save_params(tmp / "params", unstack_layers(params, config.n_layers))
        write_config(tmp, config)
        if tokenizer is not None:
            tokenizer.save(tmp)
    return Path(dst)


def write_config(directory, config: ModelConfig) -> None:
    Path(directory, "config.json").write_text(
        json.dumps({"format": FORMAT, **config.to_dict()}, indent=2) + "\n")


def read_config(path) -> ModelConfig:
    d = json.loads(Path(path, "config.json").read_text())
    d.pop("format", None)
    return ModelConfig.from_dict(d)


def read_model_dir(path):
    """(config, params in the stored layout, tokenizer or None) from a jaxlm model directory; its
    files are first checked against the checksums recorded when it was written (if it has them)."""
    checksums.verify(path)
    config = read_config(path)
    params = restore_params(Path(path, "params"), abstract_params(config))
    return config, params, load_tokenizer(path)
