"""The training loop: ``setup`` builds a run, ``Trainer`` steps it and calls its hooks.

``Trainer.training_steps()`` is a generator that runs one jitted step per iteration and yields
what hooks need; ``Trainer.train()`` drains it, reading each step's metrics one step late (so
dispatch never waits on the device) and calling every hook that is due. Periodic actions are
hooks (hooks.py), registered with ``add_hook(fn, every=N)``; ``train(cfg, hooks=...)`` adds more.
"""

from __future__ import annotations

import sys
import time
from typing import Callable, Iterator

import jax

from jaxlm.config import Config
from jaxlm.io.atomic import no_room
from jaxlm.io.checkpoints import CheckpointWriteError
from jaxlm.train.hooks import (Hook, MetricsLog, Preemption, Progress, StepInfo, checkpoint_hook, eval_hook,
                               nan_stop, pruning_hook)
from jaxlm.train.setup import Run, setup


class Trainer:
    """Steps a set-up ``Run`` and calls its hooks; see the module docstring."""

    def __init__(self, run: Run):
        self.run = run
        self.hooks: list[Hook] = []
        self.metric_hooks: list[Callable[[int, dict], None]] = []
        self.sinks: list[Callable[[dict], None]] = []
        self.last: dict = {}  # the latest step's metrics, with the latest evaluation's
        self.stop_requested = False
        self._pending = None  # (step, metrics still on the device)

    def add_hook(self, fn, every: int = 1, **flags) -> None:
        """Register a step hook: a ``Hook``, or ``fn(info)`` with ``Hook``'s settings."""
        self.hooks.append(fn if isinstance(fn, Hook) else Hook(fn, every, **flags))

    def on_metrics(self, fn: Callable[[int, dict], None]) -> None:
        """Register ``fn(step, metrics as floats)``, called once for every step, in order."""
        self.metric_hooks.append(fn)

    def on_record(self, fn: Callable[[dict], None]) -> None:
        """Register a sink for every record: each step's metrics and each evaluation's, with "step"."""
        self.sinks.append(fn)

    def record(self, record: dict) -> None:
        """Hand a record to the sinks; after the first step its values also join ``last``."""
        for fn in self.sinks:
            fn(record)
        if record["step"]:
            self.last.update((k, v) for k, v in record.items() if k != "step")

    def request_stop(self) -> None:
        self.stop_requested = True

    def training_steps(self) -> Iterator[StepInfo]:
        run = self.run
        for step in range(run.start + 1, run.total + 1):
            batch = run.to_device(next(run.train_iter))
            run.state, metrics = run.train_step(run.state, batch, run.frozen, run.masks, run.second_params)
            yield StepInfo(step, run, metrics, final=step == run.total, stopping=self.stop_requested)

    def flush(self) -> None:
        """Wait for the pending step's metrics and hand them to the metric hooks."""
        if self._pending is not None:
            step, metrics = self._pending
            self._pending = None
            host = {k: float(v) for k, v in metrics.items()}
            for fn in self.metric_hooks:
                fn(step, host)
            self.last = {}
            self.record({"step": step, **host})

    def train(self) -> dict:
        """Run the remaining steps; returns the last metrics."""
        if self.run.start == 0:
            for hook in self.hooks:
                if hook.at_start:
                    hook.fn(StepInfo(0, self.run, None))
        for info in self.training_steps():
            self.flush()  # the previous step's, read now that this one is dispatched
            self._pending = (info.step, info.metrics)
            for hook in self.hooks:
                if hook.due(info):
                    if hook.needs_metrics:
                        self.flush()
                    hook.fn(info)
            if info.stopping:
                break
        self.flush()
        return self.last


def train(cfg: Config, *, log=None, hooks=()) -> dict:
    """Run (or resume) training as ``cfg`` says; returns the last metrics. Writes ``train.workdir``.

    ``hooks``: more ``Hook``s, run after the built-in ones (checkpoint, evaluation, preemption,
    pruning) at each step they are due.
    """
    if jax.process_index() != 0:  # in a multi-host run only process 0 reports; errors still raise everywhere
        log = lambda msg: None  # noqa: E731
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    t_start = time.perf_counter()
    run = setup(cfg, log, lock_workdir=True)  # one writer per workdir
    try:
        last = _run(run, hooks)
    except OSError as e:
        reason = no_room(e)
        if reason is None or isinstance(e, CheckpointWriteError):
            raise
        # Anything else the run writes (metrics.jsonl, TensorBoard files) on a full disk.
        raise CheckpointWriteError(f"could not write {getattr(e, 'filename', None) or run.workdir}: {reason}; "
                                   f"{run.checkpoints.intact()}") from None
    finally:
        if run.lock is not None:
            run.lock.release()
    log(f"done in {time.perf_counter() - t_start:.0f}s: {run.workdir}")
    return last


def _run(run: Run, hooks) -> dict:
    trainer = Trainer(run)
    metrics_log = MetricsLog(run)
    preemption = Preemption(trainer.request_stop)
    try:
        trainer.on_metrics(nan_stop(run))  # first: a non-finite loss is never written
        trainer.on_metrics(Progress(run))
        trainer.on_record(metrics_log.write)
        trainer.add_hook(checkpoint_hook(run))
        if run.cfg.train.eval_every:
            trainer.add_hook(eval_hook(run, trainer.record))
        trainer.add_hook(preemption.hook(run))
        if run.cfg.prune.sparsity:
            trainer.add_hook(pruning_hook(run))
        for hook in hooks:
            trainer.add_hook(hook)
        last = trainer.train()
    finally:
        run.checkpoints.wait()
        run.checkpoints.close()
        metrics_log.close()
        preemption.close()
    return last

