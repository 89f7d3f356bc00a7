"""Post-training on an offline task, measured end to end: SFT, then DPO, from a small base model.

    python scripts/posttrain_demo.py                # ~20 minutes on a 2-core CPU (the base: ~7)
    python scripts/posttrain_demo.py --base PATH    # start from another byte-level model

The task comes from the standard library (jaxlm.instruct.docstring_tasks): "here is a function's
def line and docstring, write its body". Validation functions come from files the base model never
saw (the same file hash split as its pre-training data).

1. base: a 4-layer d=128 byte-level GPT trained on the standard library (configs/quickstart.yaml
   with 320-byte rows), unless --base is given;
2. SFT (`train.objective=sft`, prompt / completion pairs, packed): the held-out completion loss
   (nats per byte of the bodies) of the base and the SFT model, and samples of both (temperature 0.7, top-p 0.95, seed 0);
3. DPO (`train.objective=dpo` from the SFT model): the real body preferred over the same lines in
   an order that no longer compiles; the held-out reward accuracy after each evaluation, and the held-out completion
   loss of the DPO model beside the SFT model's; plain DPO and DPO + the chosen NLL
   (`dpo.sft_weight=1`, RPO).

Runs go to runs/posttrain/ (a finished run is reused; delete it to measure again); the results to
runs/posttrain/results.json and stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import jaxlm  # noqa: E402
from jaxlm.config import load_config  # noqa: E402
from jaxlm.instruct import docstring_tasks  # noqa: E402
from jaxlm.io import TrainCheckpoints, is_workdir  # noqa: E402
from jaxlm.report import evaluate_model, read_metrics  # noqa: E402
from jaxlm.train import train  # noqa: E402

OUT = ROOT / "runs" / "posttrain"
SEQ = ["model.max_len=320", "data.seq_len=320"]
BASE = [*SEQ, "data.batch_size=16", "train.steps=600", "train.eval_every=200", "train.save_every=200"]
# Evaluations cover the whole held-out split (train.eval_batches caps the full batches).
SFT = ["train.objective=sft", "data.seq_len=320", "data.batch_size=16", "train.steps=300", "optim.lr=1e-3",
       "optim.warmup_steps=30", "train.eval_every=50", "train.eval_batches=1000", "train.save_every=300"]
DPO = ["train.objective=dpo", "data.seq_len=320", "data.batch_size=8", "train.steps=200", "optim.lr=2e-4",
       "optim.warmup_steps=20", "dpo.beta=0.1", "train.eval_every=25", "train.eval_batches=1000",
       "train.save_every=200"]
RPO = [*DPO, "dpo.sft_weight=1.0"]


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def run(workdir: Path, overrides, config=None) -> Path:
    steps = int(next(o for o in overrides if o.startswith("train.steps=")).split("=")[1])
    if is_workdir(workdir) and TrainCheckpoints(workdir).latest_step() == steps:
        log(f"{workdir}: done before, reused")
        return workdir
    t = time.time()
    train(load_config(config, [*overrides, f"train.workdir={workdir}"]), log=lambda m: None)
    log(f"{workdir}: {steps} steps in {time.time() - t:.0f}s")
    return workdir


def completion_loss(model, tasks: Path) -> float:
    return evaluate_model(model, ["train.objective=sft", f"data.path={tasks / 'sft'}", "data.seq_len=320",
                                  "data.batch_size=16"])["loss"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", help="a byte-level base model (default: train one, ~7 minutes)")
    args = ap.parse_args()
    tasks = OUT / "tasks"
    counts = docstring_tasks(tasks, max_chars=320, val_fraction=0.05)
    log(f"task: {counts}")
    base = Path(args.base) if args.base else run(OUT / "base", BASE, ROOT / "configs" / "quickstart.yaml")
    sft = run(OUT / "sft", [*SFT, f"adapt.init={base}", f"data.path={tasks / 'sft'}"])
    dpo = run(OUT / "dpo", [*DPO, f"adapt.init={sft}", f"data.path={tasks / 'dpo'}"])
    rpo = run(OUT / "rpo", [*RPO, f"adapt.init={sft}", f"data.path={tasks / 'dpo'}"])
    runs = {"base": base, "sft": sft, "dpo": dpo, "dpo+sft": rpo}

    val = [json.loads(line) for line in (tasks / "sft" / "validation.jsonl").read_text().splitlines()]
    prompts = [val[i]["prompt"] for i in (0, len(val) // 2)]
    samples = {}
    for name, path in runs.items():
        samples[name] = jaxlm.load(path).generate(prompts, max_new_tokens=160, temperature=0.7, top_p=0.95, seed=0)
    curves = {}
    for name in ("dpo", "dpo+sft"):
        curves[name] = [(m["step"], round(m["val_reward_accuracy"], 3), round(m["val_chosen_loss"], 4))
                        for m in read_metrics(runs[name]) if "val_reward_accuracy" in m]
    results = {"task": counts, "completion_loss": {name: completion_loss(path, tasks) for name, path in runs.items()},
               "curves (step, val_reward_accuracy, val_chosen_loss)": curves,
               "samples": {"prompts": prompts, **samples}}
    (OUT / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    cl = results["completion_loss"]
    print("held-out completion loss (nats per byte of the bodies): "
          + ", ".join(f"{name} {loss:.4f}" for name, loss in cl.items()))
    for name, curve in curves.items():
        print(f"{name}: held-out reward accuracy by step: " + ", ".join(f"{s}: {a:.3f}" for s, a, _ in curve))
        print(f"{name}: held-out loss on chosen bodies by step: " + ", ".join(f"{s}: {c:.4f}" for s, _, c in curve))
    for i, p in enumerate(prompts):
        print(f"\n--- prompt {i + 1} ---\n{p}", end="")
        for name in runs:
            print(f"--- {name} ---\n{samples[name][i]}")


if __name__ == "__main__":
    main()
