"""jaxlm model directories: ``config.json`` (the ModelConfig), orbax ``params/``, tokenizer files.

Writes are atomic (``atomic.atomic_dir``): everything goes to a hidden sibling directory that is
renamed into place only once complete, so a failure never leaves a half-written destination or
touches an existing one. Params are stored in the stacked layout whatever ``scan_layers`` says.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import orbax.checkpoint.experimental.v1 as ocp

from jaxlm.config import ModelConfig
from jaxlm.io.atomic import atomic_dir
from jaxlm.tokenizer import load_tokenizer
from jaxlm.transformer import abstract_params, stack_layers

FORMAT = "jaxlm-model-v1"


def is_model_dir(path) -> bool:
    p = Path(path, "config.json")
    return p.is_file() and json.loads(p.read_text()).get("format") == FORMAT


def save_params(path, params) -> None:
    """Write a pytree of arrays (numpy or jax) as an orbax checkpoint at ``path`` (must not exist)."""
    ocp.save(Path(path).absolute(), params)


class StreamingParamWriter:
    """Write a param tree piece by piece (orbax partial saves), holding one piece in memory at a time."""

    def __init__(self, path):
        self.path = Path(path).absolute()

    def write(self, subtree: dict) -> None:
        ocp.partial.save(self.path, subtree)

    def finalize(self) -> None:
        ocp.partial.finalize(self.path)


def restore_params(path, abstract, sharding=None):
    """Read an orbax param tree shaped like ``abstract`` (ShapeDtypeStructs), each leaf in the dtype
    it was stored in (a bfloat16 checkpoint stays bfloat16).

    ``sharding``: a pytree of shardings like ``abstract``, or None for the first local device.
    """
    if sharding is None:
        one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        sharding = jax.tree.map(lambda _: one, abstract)
    path = Path(path).absolute()
    stored = ocp.metadata(path).metadata
    _check_tree(stored, abstract)
    dtypes = {jax.tree_util.keystr(k): m.dtype for k, m in jax.tree_util.tree_leaves_with_path(stored)}
    target = jax.tree_util.tree_map_with_path(
        lambda k, a, s: jax.ShapeDtypeStruct(a.shape, dtypes.get(jax.tree_util.keystr(k), a.dtype), sharding=s),
        abstract, sharding)
    return ocp.load(path, target)


def read_param(path, name: str):
    """One parameter of an orbax param tree (``name``: its dotted path, e.g. "embed.tokens.embedding"),
    read alone: the other leaves stay on disk."""
    path = Path(path).absolute()
    one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    keys = tuple(name.split("."))

    def target(k, m):
        here = tuple(str(getattr(p, "key", p)) for p in k)
        return jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one) if here == keys else ocp.PLACEHOLDER

    tree = ocp.load(path, jax.tree_util.tree_map_with_path(target, ocp.metadata(path).metadata))
    for k in keys:
        tree = tree[k]
    return tree


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
    with atomic_dir(dst, overwrite) as tmp:
        save_params(tmp / "params", stack_layers(params))
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


def read_model_dir(path, sharding=None):
    """(config, params in the stacked layout, tokenizer or None) from a jaxlm model directory."""
    config = read_config(path)
    params = restore_params(Path(path, "params"), abstract_params(config), sharding)
    return config, params, load_tokenizer(path)
