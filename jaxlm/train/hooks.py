"""The periodic actions of a training run, each a hook on the loop (loop.py): evaluation,
checkpoints, pruning masks, preemption; and what happens to each step's metrics once they reach
the host: the NaN stop, metrics.jsonl + TensorBoard, the progress line.

Step hooks run after a step is dispatched, when ``Hook.due`` says so; metric hooks get every
step's metrics as floats, one step late unless a step hook asked for them sooner.
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import sys
import time
from typing import Callable

import jax

from jaxlm.compress.prune import apply_masks, check_sparsity, magnitude_masks, sparsity_at
from jaxlm.config import PruneConfig
from jaxlm.train.evaluate import evaluate
from jaxlm.train.setup import Run


class TrainingError(RuntimeError):
    """A run that cannot continue (e.g. the loss became NaN); the message names the step."""


@dataclasses.dataclass(frozen=True)
class StepInfo:
    """What a hook sees: the step just dispatched (1-based; 0 before a fresh run's first step)
    and the run (``run.state`` is the state after it)."""

    step: int
    run: Run
    metrics: dict | None  # this step's metrics, still on the device (None before the first step)
    final: bool = False  # step == train.steps
    stopping: bool = False  # preemption: the last step this process runs


@dataclasses.dataclass(frozen=True)
class Hook:
    """``fn(info)`` after every step divisible by ``every`` (0: none), and at the moments flagged."""

    fn: Callable[[StepInfo], None]
    every: int = 1
    at_end: bool = True  # after the final step too
    at_stop: bool = False  # after the step a preemption stops at
    at_start: bool = False  # before the first step of a fresh run
    needs_metrics: bool = False  # read (and check) this step's metrics first

    def due(self, info: StepInfo) -> bool:
        return bool((self.every and info.step % self.every == 0) or (self.at_end and info.final)
                    or (self.at_stop and info.stopping))


# Step hooks -------------------------------------------------------------------------------------

def checkpoint_hook(run: Run) -> Hook:
    """Save params, optimizer and data-iterator state every train.save_every steps, at the end and
    on preemption (asynchronously; metrics first, so a state with a non-finite loss is never saved)."""
    def save(info: StepInfo) -> None:
        run.checkpoints.save(info.step, run.state["params"], run.state["opt_state"], run.train_iter,
                             {"step": info.step, "config": run.cfg.to_dict()}, force=True)

    return Hook(save, every=run.cfg.train.save_every, at_end=True, at_stop=True, needs_metrics=True)


def eval_hook(run: Run, record: Callable[[dict], None]) -> Hook:
    """Validation loss / accuracy (and macro-F1 for classifiers) every train.eval_every steps, at
    the end and before a fresh run's first step."""
    cfg = run.cfg
    pi, pc = jax.process_index(), jax.process_count()

    def run_eval(info: StepInfo) -> None:
        totals = evaluate(run.eval_step, run.full_params(run.state["params"]), run.val_rows,
                          batch_size=cfg.data.batch_size, batches=run.eval_batches(), to_device=run.to_device,
                          process_index=pi, process_count=pc)
        metrics = {"val_loss": totals.loss, **{f"val_{k}": v for k, v in totals.metrics.items()},
                   **{f"val_{k}": v for k, v in run.objective.eval_metrics(totals).items()}}
        record({"step": info.step, **metrics})
        if info.step:
            run.log(f"step {info.step}: val_loss {metrics['val_loss']:.4f}")

    return Hook(run_eval, every=cfg.train.eval_every, at_start=True, needs_metrics=True)


class Pruner:
    """Magnitude masks on the schedule of ``prune.*``; recomputed from the current weights each
    time the scheduled sparsity changes (and on resume, where the zeros give the same masks)."""

    def __init__(self, prune: PruneConfig, log):
        check_sparsity(prune.sparsity)
        if jax.process_count() > 1:  # masks are computed on the host from the gathered weights
            raise ValueError("prune.sparsity works in single-process runs (one host, any number of devices)")
        self.prune, self.log = prune, log

    def level(self, step: int) -> float:
        p = self.prune
        if step < p.start:
            return 0.0
        if p.end <= p.start:
            return p.sparsity
        last = p.start + ((min(step, p.end) - p.start) // p.every) * p.every
        return sparsity_at(p.end if step >= p.end else last, final=p.sparsity, start=p.start, end=p.end)

    def changes_at(self, step: int) -> bool:
        return step >= self.prune.start and self.level(step) != self.level(step - 1)

    def masks_for(self, step: int, state):
        """Masks for the steps after ``step`` (None below any sparsity); applied to state["params"]."""
        level = self.level(step)
        if level == 0:
            return None
        masks = magnitude_masks(state["params"], level, scope=self.prune.scope)
        masks = jax.tree.map(lambda m, p: jax.device_put(m, p.sharding), masks, _like(masks, state["params"]))
        state["params"] = apply_masks(state["params"], masks)
        self.log(f"step {step}: pruned to sparsity {level:.3f}")
        return masks


def _like(masks, params):
    """The leaves of ``params`` at the paths of ``masks``."""
    return {k: _like(v, params[k]) if isinstance(v, dict) else params[k] for k, v in masks.items()}


def pruning_hook(run: Run) -> Hook:
    """New masks for the next steps whenever the scheduled sparsity changes (the masks for the
    restored step are made here, before the first step)."""
    pruner = Pruner(run.cfg.prune, run.log)
    run.masks = pruner.masks_for(run.start, run.state)

    def update(info: StepInfo) -> None:
        if not info.final and pruner.changes_at(info.step):
            run.masks = pruner.masks_for(info.step, run.state)

    return Hook(update, every=1, at_end=False)


class Preemption:
    """SIGTERM (a preempted VM, ``scancel``) asks the loop to stop after the current step, which
    the checkpoint hook then saves; the run exits normally."""

    def __init__(self, request_stop: Callable[[], None]):
        self._previous = signal.signal(signal.SIGTERM, lambda s, f: request_stop())

    def hook(self, run: Run) -> Hook:
        return Hook(lambda info: run.log(f"SIGTERM: saved step {info.step}; exiting"), every=0, at_end=False,
                    at_stop=True)

    def close(self) -> None:
        signal.signal(signal.SIGTERM, self._previous)


# Metric hooks -----------------------------------------------------------------------------------

def nan_stop(run: Run) -> Callable[[int, dict], None]:
    """Stop (TrainingError) at the first non-finite loss, naming the last good checkpoint."""
    def check(step: int, m: dict) -> None:
        if not math.isfinite(m["loss"]):
            raise TrainingError(f"loss became {m['loss']} at step {step}; stopped. The last good checkpoint "
                                f"is step {run.checkpoints.latest_step()} in {run.workdir}/checkpoints")
    return check


class MetricsLog:
    """``metrics.jsonl`` (one JSON object per line) and TensorBoard scalars, written by process 0."""

    def __init__(self, run: Run):
        self.path = run.workdir / "metrics.jsonl"
        self.board = _board(run.workdir) if jax.process_index() == 0 else None

    def write(self, record: dict) -> None:
        if self.board is None:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for k, v in record.items():
            if k != "step":
                self.board.add_scalar(k, v, record["step"])

    def close(self) -> None:
        if self.board is not None:
            self.board.close()


def _board(workdir):
    """TensorBoard event files in WORKDIR/tensorboard (tensorboardX: no TensorFlow needed)."""
    # tensorboardX imports torch whenever it is installed (~2 s and ~300 MB per training process)
    # only to accept torch tensors; jaxlm logs floats, so keep torch out unless already imported.
    keep_torch_out = "torch" not in sys.modules
    if keep_torch_out:
        sys.modules["torch"] = None  # makes `import torch` raise ImportError, which tensorboardX handles
    try:
        from tensorboardX import SummaryWriter  # lazy: only process 0 of a training run writes events
    finally:
        if keep_torch_out:
            del sys.modules["torch"]
    return SummaryWriter(str(workdir / "tensorboard"), flush_secs=10)


def flops_per_token(cfg, seq_len: int) -> float:
    """Training FLOPs per token: 6N (N non-embedding parameters) + 12 * L * D * T attention."""
    d, L = cfg.d_model, cfg.n_layers
    n = L * (2 * d * cfg.n_heads * cfg.dim_per_head + 2 * d * cfg.kv_heads * cfg.dim_per_head
             + (3 if cfg.gated_mlp else 2) * d * cfg.mlp_dim)
    return 6 * n + 12 * L * d * seq_len


PEAK_TFLOPS_BF16 = {"TPU v4": 275, "TPU v5 lite": 197, "TPU v5e": 197, "TPU v5p": 459, "TPU v6e": 918,
                    "TPU v6 lite": 918, "A100": 312, "H100": 989, "H200": 989}


def peak_flops(device) -> float | None:
    kind = getattr(device, "device_kind", "")
    for name, tflops in PEAK_TFLOPS_BF16.items():
        if name.lower() in kind.lower():
            return tflops * 1e12
    return None


class Progress:
    """One status line every train.log_every steps: step, loss, lr, tokens/s, GFLOP/s or MFU, ETA."""

    def __init__(self, run: Run):
        cfg = run.cfg
        self.run, self.total, self.every = run, cfg.train.steps, cfg.train.log_every
        self.tps = cfg.data.batch_size * cfg.data.seq_len
        self.fps = flops_per_token(cfg.model, cfg.data.seq_len) * self.tps
        self.t0, self.s0 = time.perf_counter(), run.start
        self.peak = peak_flops(jax.devices()[0])

    def __call__(self, step: int, m: dict) -> None:
        if step % self.every == 0 or step == self.total:
            self.run.log(self.line(step, m))

    def line(self, step, m) -> str:
        dt = max(time.perf_counter() - self.t0, 1e-9)
        rate = (step - self.s0) / dt
        eta = (self.total - step) / rate if rate > 0 else float("nan")
        flops = self.fps * rate
        util = (f"MFU {100 * flops / (self.peak * jax.device_count()):.1f}%" if self.peak
                else f"{flops / 1e9:.1f} GFLOP/s")
        return (f"step {step}/{self.total} | loss {m['loss']:.4f} | lr {m['lr']:.2e} | "
                f"{self.tps * rate:,.0f} tok/s | {util} | ETA {eta:.0f}s")
