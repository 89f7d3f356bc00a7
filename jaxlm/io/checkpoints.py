"""Training-state checkpoints: ``WORKDIR/checkpoints/<step>/`` through an orbax CheckpointManager."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import time
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import type_handlers
from orbax.checkpoint._src.metadata import array_metadata_store

from jaxlm.io import checksums
from jaxlm.io.atomic import no_room


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


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (e.g. the disk is full); the message names the step."""


class TrainCheckpoints:
    """``WORKDIR/checkpoints/<step>/``: params, optimizer state, data-iterator state and the config.

    Saves are asynchronous and atomic (orbax writes to a temporary dir and renames on commit), so a
    save cut off mid-write is ignored and the previous complete checkpoint is used. Each checkpoint
    is sealed before its commit (``checksums.json``: the SHA-256 of every file, written by process
    0 in orbax's save thread), so ``verify(step)`` detects bytes damaged after the save.
    """

    def __init__(self, workdir, *, keep: int = 3):
        _small_arrays_whole()
        self.workdir = Path(workdir).absolute()
        self.directory = self.workdir / "checkpoints"
        self._saving: int | None = None  # the step of the save in flight
        self.manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, enable_async_checkpointing=True, create=True,
                async_options=ocp.AsyncOptions(post_finalization_callback=self._seal)))

    def latest_step(self):
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def _seal(self) -> None:
        """Record the checksums of the save in flight, in its temporary directory, before orbax
        renames it into place: a committed checkpoint always carries them."""
        step = self._saving
        if step is None or jax.process_index() != 0:
            return
        tmp = sorted(self.directory.glob(f"{step}.orbax-checkpoint-tmp*"), key=lambda p: p.stat().st_mtime)
        # orbax rewrites its step metadata when it renames the directory: bookkeeping, not data.
        checksums.seal(tmp[-1] if tmp else self.directory / str(step),
                       skip=("_CHECKPOINT_METADATA", "commit_success.txt"))

    def save(self, step: int, params, opt_state, data_iter, meta: dict, *, force: bool = False) -> None:
        import grain  # lazy (~0.4 s): reading a workdir's params (jaxlm.load) does not need it

        self._wait_or_explain()  # the previous save's failure is reported as that step's
        self._saving = step
        with self._explained(step):
            self.manager.save(step, force=force, args=ocp.args.Composite(
                params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state),
                data=grain.checkpoint.CheckpointSave(data_iter), meta=ocp.args.JsonSave(meta)))

    @contextlib.contextmanager
    def _explained(self, step: int):
        """Turn a write that ran out of room into one line naming the step and the checkpoint
        that is intact."""
        try:
            yield
        except Exception as e:
            reason = no_room(e)
            if reason is None:
                raise
            raise CheckpointWriteError(f"could not write the checkpoint of step {step} to {self.directory}: "
                                       f"{reason}; {self.intact(but=step)}") from None

    def intact(self, but: int | None = None) -> str:
        """What a run stopped by a full disk still has: the latest committed checkpoint (other
        than step ``but``), read from the directory (also after ``close``)."""
        steps = sorted(int(p.name) for p in self.directory.iterdir() if p.name.isdigit() and int(p.name) != but)
        return (f"the checkpoint of step {steps[-1]} is intact: free space, then run again to resume from it"
                if steps else "there is no earlier checkpoint")

    def _wait_or_explain(self) -> None:
        step = self._saving
        with self._explained(step if step is not None else -1):
            self.manager.wait_until_finished()

    def verify(self, step: int) -> bool:
        """Raise ``checksums.DamagedError`` if a file of checkpoint ``step`` differs from the
        checksums recorded at its save; False for a checkpoint without them (an earlier jaxlm)."""
        return checksums.verify(self.directory / str(step))

    def set_aside(self, step: int) -> Path:
        """Move a damaged checkpoint out of the way (``WORKDIR/damaged/<step>-<time>``, kept for
        inspection, never deleted) so that training resumes from the one before; on every process
        (process 0 moves it)."""
        dst = self.workdir / "damaged" / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
        if jax.process_index() == 0:
            dst.parent.mkdir(exist_ok=True)
            os.rename(self.directory / str(step), dst)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices(f"jaxlm-set-aside-{step}")
        self.manager.reload()
        return dst

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
        self._wait_or_explain()

    def close(self) -> None:
        self.manager.close()
