"""jaxlm model directories: ``config.json`` (the ModelConfig), orbax ``params/``, tokenizer files.

Writes are atomic: everything goes to a hidden sibling directory that is renamed into place only
once complete, so a failure never leaves a half-written destination or touches an existing one.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import uuid
from pathlib import Path

import jax

from jaxlm.config import ModelConfig

FORMAT = "jaxlm-model-v1"


def is_model_dir(path) -> bool:
    p = Path(path, "config.json")
    return p.is_file() and json.loads(p.read_text()).get("format") == FORMAT


def check_destination(dst, *, overwrite: bool = False) -> Path:
    """``dst`` as an absolute path, if it may be written: absent, empty, or ``overwrite``."""
    dst = Path(dst).absolute()
    if dst.exists() and not dst.is_dir():
        raise FileExistsError(f"destination {dst} exists and is not a directory")
    if dst.is_dir() and any(dst.iterdir()) and not overwrite:
        raise FileExistsError(f"destination {dst} exists and is not empty; pass --overwrite to replace it")
    return dst


@contextlib.contextmanager
def atomic_dir(dst, overwrite: bool = False):
    """Yield a fresh temporary directory that becomes ``dst`` if the block succeeds.

    Refuses a ``dst`` that exists and is not empty unless ``overwrite``; on failure the
    temporary directory is removed and ``dst`` is left exactly as it was.
    """
    dst = check_destination(dst, overwrite=overwrite)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if dst.exists():
        old = dst.parent / f".{dst.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(dst, old)
    os.rename(tmp, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def save_params(path, params) -> None:
    """Write a pytree of arrays (numpy or jax) as an orbax checkpoint at ``path`` (must not exist)."""
    import orbax.checkpoint.experimental.v1 as ocp

    ocp.save(Path(path).absolute(), params)


class StreamingParamWriter:
    """Write a param tree piece by piece (orbax partial saves), holding one piece in memory at a time."""

    def __init__(self, path):
        import orbax.checkpoint.experimental.v1 as ocp

        self._ocp, self.path = ocp, Path(path).absolute()

    def write(self, subtree: dict) -> None:
        self._ocp.partial.save(self.path, subtree)

    def finalize(self) -> None:
        self._ocp.partial.finalize(self.path)


def restore_params(path, abstract, sharding=None):
    """Read an orbax param tree shaped like ``abstract`` (ShapeDtypeStructs).

    ``sharding``: a pytree of shardings like ``abstract``, or None for the first local device.
    """
    import orbax.checkpoint.experimental.v1 as ocp

    if sharding is None:
        one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        sharding = jax.tree.map(lambda _: one, abstract)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, sharding)
    path = Path(path).absolute()
    _check_tree(ocp.metadata(path).metadata, abstract)
    return ocp.load(path, target)


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
    """Write a jaxlm model directory atomically. ``params``: pure dict of arrays."""
    from jaxlm.transformer import stack_layers

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


def load_model(path, sharding=None):
    """(config, params, tokenizer) from a jaxlm model directory."""
    from jaxlm.tokenizer import load_tokenizer
    from jaxlm.transformer import abstract_params

    config = read_config(path)
    params = restore_params(Path(path, "params"), abstract_params(config), sharding)
    return config, params, load_tokenizer(path)


# Training checkpoints ---------------------------------------------------------------------------

@functools.cache
def _small_arrays_whole() -> None:
    """Save arrays under 1 MiB per replica whole, from one replica.

    Orbax splits every replicated array across its replicas for saving ("replica-parallel"); each
    split is a small jitted slice, compiled per shape and device: about 3 s on the first save of a
    tiny model on 8 devices, for arrays (norms, biases, counters) too small to gain anything.
    Larger arrays are still written in parallel by their replicas.
    """
    from orbax.checkpoint import type_handlers
    from orbax.checkpoint._src.metadata import array_metadata_store

    import logging

    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)  # not the "overriding jax.Array" warning on every run
    try:
        type_handlers.register_type_handler(jax.Array, type_handlers.ArrayHandler(
            array_metadata_store=array_metadata_store.Store(), min_slice_bytes_for_replica_parallel=1 << 20),
            override=True)
    finally:
        absl_logger.setLevel(level)


class TrainCheckpoints:
    """``WORKDIR/checkpoints/<step>/``: params, optimizer state, data-iterator state and the config.

    Saves are asynchronous and atomic (orbax writes to a temporary dir and renames on commit), so a
    save cut off mid-write is ignored and the previous complete checkpoint is used.
    """

    def __init__(self, workdir, *, keep: int = 3):
        import orbax.checkpoint as ocp

        _small_arrays_whole()
        self._ocp = ocp
        self.directory = Path(workdir, "checkpoints").absolute()
        self.manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, enable_async_checkpointing=True, create=True))

    def latest_step(self):
        return self.manager.latest_step()

    def save(self, step: int, params, opt_state, data_iter, meta: dict, *, force: bool = False) -> None:
        import grain

        ocp = self._ocp
        self.manager.save(step, force=force, args=ocp.args.Composite(
            params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state),
            data=grain.checkpoint.CheckpointSave(data_iter), meta=ocp.args.JsonSave(meta)))

    def meta(self, step: int) -> dict:
        ocp = self._ocp
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def restore(self, step: int, abstract_params, abstract_opt_state, data_iter):
        """(params, opt_state); ``data_iter`` is moved to its saved position in place."""
        import grain

        ocp = self._ocp
        out = self.manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract_params),
            opt_state=ocp.args.StandardRestore(abstract_opt_state),
            data=grain.checkpoint.CheckpointRestore(data_iter)))
        return out["params"], out["opt_state"]

    def restore_params(self, step: int, abstract_params):
        ocp = self._ocp
        return self.manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract_params)))["params"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def is_workdir(path) -> bool:
    return Path(path, "checkpoints").is_dir() and Path(path, "config.json").is_file()


def load_workdir(path):
    """(model config, params, tokenizer) from a training workdir's latest checkpoint, on one device."""
    from flax import nnx

    from jaxlm.compress import tree
    from jaxlm.config import Config
    from jaxlm.tokenizer import load_tokenizer
    from jaxlm.train import trainable_filter
    from jaxlm.transformer import abstract_model

    cfg = Config.from_dict(json.loads(Path(path, "config.json").read_text()))
    ckpts = TrainCheckpoints(path)
    step = ckpts.latest_step()
    if step is None:
        raise ValueError(f"training workdir {path} holds no complete checkpoint yet")
    one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    # Training checkpoints keep the run's own layout (stacked or per-layer, by model.scan_layers).
    layout = nnx.to_pure_dict(nnx.state(abstract_model(cfg.model), nnx.Param))
    adapted = cfg.adapt.method in ("lora", "prompt")
    if adapted:  # the checkpoints hold the adapters or prompt; the frozen base is the model they started from
        layout, _ = tree.split(layout, trainable_filter(cfg.adapt.method))
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=one), layout)
    params = ckpts.restore_params(step, abstract)
    ckpts.close()
    if adapted:
        from jaxlm.api import load

        base = load(cfg.adapt.init, scan_layers=cfg.model.scan_layers)  # the base must still exist
        params = tree.merge(base.params, params)
    return cfg.model, params, load_tokenizer(path)

