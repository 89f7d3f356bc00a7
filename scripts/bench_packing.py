"""Packing speed, side by side in one run on this machine:

- SFT: examples per second with data.packing=segments (several examples per row, each attending
  only to itself) against data.packing=pad (one example per row, padded to the longest: rows of
  1024 bytes on both sides, the length of the longest example);
- pre-training (clm): tokens per second with data.packing=eos (documents joined by EOS, attention
  across them) against data.packing=segments (no attention across documents).

    python scripts/bench_packing.py [--rounds 3] [--steps 8]

The same model (configs/quickstart.yaml's shape) and data for both sides: for SFT the docstring
task of scripts/posttrain_demo.py with functions up to 1024 characters (a long-tailed length
distribution, as chat data has), for clm the standard library in 320-byte rows; the sides alternate in
each round, every jitted step is compiled and warmed before timing, and the median over rounds is
printed. Nothing else should run on the machine meanwhile.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from jaxlm.config import load_config  # noqa: E402
from jaxlm.instruct import docstring_tasks  # noqa: E402
from jaxlm.train.setup import setup  # noqa: E402

COMMON = ["train.steps=1000", "train.eval_every=0"]
SFT_ROWS = ["model.max_len=1024", "data.seq_len=1024", "data.batch_size=8"]
CLM_ROWS = ["model.max_len=320", "data.seq_len=320", "data.batch_size=16"]


def prepare(overrides, workdir):
    logs = []
    run = setup(load_config(ROOT / "configs" / "quickstart.yaml", [*COMMON, *overrides, f"train.workdir={workdir}"]),
                log=logs.append)
    for line in logs:
        if line.startswith("sft train"):
            print("  " + line, flush=True)
    return run


def timed(run, steps: int):
    """(seconds, examples, tokens) of ``steps`` training steps; examples = segments in the rows."""
    examples = tokens = 0
    t = time.perf_counter()
    for _ in range(steps):
        rows = next(run.train_iter)
        if isinstance(rows, dict):
            seg = np.asarray(rows["segments"])
            examples += sum(len(np.unique(r[r > 0])) for r in seg)
            tokens += int((seg > 0).sum())
        else:
            examples += len(rows)
            tokens += rows.shape[0] * (rows.shape[1] - 1)
        run.state, metrics = run.train_step(run.state, run.to_device(rows), run.frozen, run.masks, run.second_params)
    jax.block_until_ready(metrics)
    return time.perf_counter() - t, examples, tokens


def compare(sides: dict, rounds: int, steps: int, unit: str):
    for run in sides.values():
        timed(run, 2)  # compile and warm
    rates = {k: [] for k in sides}
    for r in range(rounds):
        for name, run in sides.items():
            secs, examples, tokens = timed(run, steps)
            rates[name].append((examples if unit == "examples" else tokens) / secs)
        print(f"  round {r + 1}: " + ", ".join(f"{k} {v[-1]:,.1f} {unit}/s" for k, v in rates.items()), flush=True)
    med = {k: statistics.median(v) for k, v in rates.items()}
    spread = {k: (min(v), max(v)) for k, v in rates.items()}
    return med, spread


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=8)
    args = ap.parse_args()
    load = os.getloadavg()[0]
    if load > (os.cpu_count() or 1) * 0.5:
        print(f"warning: load average {load:.1f} on {os.cpu_count()} cores: the numbers will be noisy", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        tasks = Path(tmp) / "tasks"
        counts = docstring_tasks(tasks, max_chars=1024, val_fraction=0.05)
        sft = [*SFT_ROWS, f"data.path={tasks / 'sft'}", "train.objective=sft"]
        print(f"SFT data: {counts['sft_train']} examples (docstring task, functions up to 1024 characters)")
        sides = {"segments": prepare([*sft, "data.packing=segments"], Path(tmp) / "packed"),
                 "pad": prepare([*sft, "data.packing=pad"], Path(tmp) / "pad")}
        print("SFT (1024-byte rows, batch 8): examples per second", flush=True)
        med, spread = compare(sides, args.rounds, args.steps, "examples")
        ratio = med["segments"] / med["pad"]
        print(f"SFT: packed {med['segments']:,.1f} examples/s (range {spread['segments'][0]:,.1f}-"
              f"{spread['segments'][1]:,.1f}), padded {med['pad']:,.1f} (range {spread['pad'][0]:,.1f}-"
              f"{spread['pad'][1]:,.1f}): packed / padded = {ratio:.2f}x")
        for run in sides.values():
            run.checkpoints.close()

        sides = {"eos": prepare([*CLM_ROWS, "data.packing=eos"], Path(tmp) / "eos"),
                 "segments": prepare([*CLM_ROWS, "data.packing=segments"], Path(tmp) / "seg")}
        print("clm pre-training (standard library, 320-byte rows, batch 16): tokens per second", flush=True)
        med, spread = compare(sides, args.rounds, args.steps, "tokens")
        print(f"clm: eos packing {med['eos']:,.0f} tokens/s, segments {med['segments']:,.0f}: segments / eos = "
              f"{med['segments'] / med['eos']:.2f}x")
        for run in sides.values():
            run.checkpoints.close()


if __name__ == "__main__":
    main()
