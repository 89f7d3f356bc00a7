"""Training-state checkpoints: ``WORKDIR/checkpoints/<step>/`` through an orbax CheckpointManager."""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import type_handlers
from orbax.checkpoint._src.metadata import array_metadata_store


def is_workdir(path) -> bool:
    return Path(path, "checkpoints").is_dir() and Path(path, "config.json").is_file()


@functools.cache
def _small_arrays_whole() -> None:
    """Save arrays under 1 MiB per replica whole, from one replica.

    Orbax splits every replicated array across its replicas for saving ("replica-parallel"); each
    split is a small jitted slice, compiled per shape and device: about 3 s on the first save of a
    tiny model on 8 devices, for arrays (norms, biases, counters) too small to gain anything.
    Larger arrays are still written in parallel by their replicas.
    """
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
        _small_arrays_whole()
        self.directory = Path(workdir, "checkpoints").absolute()
        self.manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, enable_async_checkpointing=True, create=True))

    def latest_step(self):
        return self.manager.latest_step()

    def save(self, step: int, params, opt_state, data_iter, meta: dict, *, force: bool = False) -> None:
        import grain  # lazy (~0.4 s): reading a workdir's params (jaxlm.load) does not need it

        self.manager.save(step, force=force, args=ocp.args.Composite(
            params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state),
            data=grain.checkpoint.CheckpointSave(data_iter), meta=ocp.args.JsonSave(meta)))

    def meta(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def restore(self, step: int, abstract_params, abstract_opt_state, data_iter):
        """(params, opt_state); ``data_iter`` is moved to its saved position in place."""
        import grain  # lazy: see save

        out = self.manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract_params),
            opt_state=ocp.args.StandardRestore(abstract_opt_state),
            data=grain.checkpoint.CheckpointRestore(data_iter)))
        return out["params"], out["opt_state"]

    def restore_params(self, step: int, abstract_params):
        return self.manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract_params)))["params"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
