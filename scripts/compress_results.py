"""The compression and adaptation results table of the README, measured in one run.

    python scripts/compress_results.py            # ~40 minutes on a 2-core CPU (the teacher: ~15)

Everything goes through the library's own commands and functions (jaxlm train / eval, the
compress transforms, jaxlm.load + generate) on the offline default corpus (the standard library's
.py files, byte-level):

- the teacher: configs/teacher.yaml (8 layers, d=192), trained by `jaxlm train` if runs/teacher
  has no final checkpoint;
- compression of the teacher: int8 weight-only, SVD low-rank MLP, 50% magnitude pruning (one
  shot, and gradual with fine-tuning), attention-head pruning (3 of 6 heads, with fine-tuning);
- distillation: a 4-layer d=128 student trained for the same steps with and without the teacher;
- adaptation of the teacher to one package (idlelib): LoRA, prompt tuning, full fine-tuning;
- classification: a tiny BERT fine-tuned on the package task, against the majority class.

Columns: parameters (trained ones in brackets where the rest is frozen), bytes of the saved
parameters, validation loss (nats per byte) or accuracy, batch-1 greedy generation tokens/s
(120 new tokens without stopping at EOS; median of 7 rounds, models interleaved). Results are cached in runs/compress/*.json;
delete a file to measure that row again.
"""

from __future__ import annotations

import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import jaxlm  # noqa: E402
from jaxlm.io import TrainCheckpoints, is_workdir  # noqa: E402
from jaxlm.config import load_config  # noqa: E402
from jaxlm.data import stdlib_dir  # noqa: E402
from jaxlm.report import evaluate_model  # noqa: E402
from jaxlm.train import train  # noqa: E402

RUNS = ROOT / "runs" / "compress"
TEACHER = ROOT / "runs" / "teacher"
PROMPTS = ["def ", "import os\n", "class ", "    return ", "if __name__", "from typing import",
           "# ", "    def __init__(self", "for i in range(", "raise ValueError("]
STUDENT = ["model.d_model=128", "model.n_layers=4", "model.n_heads=4", "train.steps=300"]
DOMAIN = ["data.path=" + str(stdlib_dir() / "idlelib" / "**" / "*.py"), "data.val_fraction=0.2"]


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def quiet(msg):
    pass


def run_train(workdir, overrides, base="configs/teacher.yaml"):
    """`jaxlm train` into workdir (resumed if it stopped early, e.g. on SIGTERM)."""
    cfg = load_config(ROOT / base, [f"train.workdir={workdir}", "train.eval_every=0", *overrides])
    if is_workdir(workdir) and (workdir / "checkpoints" / str(cfg.train.steps)).is_dir():
        return
    train(cfg, log=quiet)
    if not (workdir / "checkpoints" / str(cfg.train.steps)).is_dir():
        raise SystemExit(f"{workdir} stopped before step {cfg.train.steps}")


def params_bytes(path: Path) -> int:
    """Bytes of the saved parameters: a model dir's params/, or a workdir's latest checkpoint."""
    if is_workdir(path):
        ck = TrainCheckpoints(path)
        d = path / "checkpoints" / str(ck.latest_step()) / "params"
        ck.close()
    else:
        d = path / "params"
    return sum(f.stat().st_size for f in d.rglob("*") if f.is_file())


NEW_TOKENS = 120


def speeds(paths: dict) -> dict:
    """Batch-1 greedy tokens/s of each model over exactly NEW_TOKENS new tokens (no EOS stop, so
    the same work for all): 7 rounds, the models interleaved within each round, median per model."""
    from jaxlm.api import LM

    models = {}
    for name, path in paths.items():
        lm = jaxlm.load(path)
        no_eos = LM(lm.config.replace(eos_token_id=None), lm.params)  # no tokenizer: no EOS either
        prompt = [lm.tokenizer.encode("def ")]
        new = min(NEW_TOKENS, lm.config.context - len(prompt[0]))  # a soft prompt takes 20 positions
        no_eos.generate(prompt, max_new_tokens=new)  # compile
        models[name] = (no_eos, prompt, new)
    times = {name: [] for name in models}
    for _ in range(7):
        for name, (lm, prompt, new) in models.items():
            t = time.perf_counter()
            lm.generate(prompt, max_new_tokens=new)
            times[name].append(time.perf_counter() - t)
    return {name: models[name][2] / statistics.median(t) for name, t in times.items()}


def measure(name, path, *, data=(), trained=None, extra=None):
    cache = RUNS / f"{name}.json"
    if cache.exists():
        return json.loads(cache.read_text())
    lm = jaxlm.load(path)
    n = int(sum(np.prod(x.shape) for x in __import__("jax").tree.leaves(lm.params)))
    ev = evaluate_model(path, ["data.seq_len=128", "data.batch_size=32", *data], batches=16)
    row = {"name": name, "path": str(path), "params": n, "trained": trained, "bytes": params_bytes(path),
           "val_loss": ev.get("loss"), "accuracy": ev.get("accuracy"), **(extra or {})}
    cache.write_text(json.dumps(row))
    log(json.dumps(row))
    return row


def greedy_agreement(ref, other, new=32):
    """(free-running position agreement, teacher-forced next-token agreement) over PROMPTS."""
    free = forced = total = 0
    for p in PROMPTS:
        ids = ref.tokenizer.encode(p)
        a = ref.generate([ids], max_new_tokens=new)[0, len(ids):]
        b = other.generate([ids], max_new_tokens=new)[0, len(ids):]
        free += int(np.sum(a == b))
        seq = np.array([ids + list(a)])
        la, lb = np.asarray(ref.logits(seq))[0, len(ids) - 1:-1], np.asarray(other.logits(seq))[0, len(ids) - 1:-1]
        forced += int(np.sum(la.argmax(-1) == lb.argmax(-1)))
        total += new
    return free / total, forced / total


def transform(name, fn):
    dst = RUNS / name
    if not (dst / "config.json").exists():
        from jaxlm.api import LM

        lm = jaxlm.load(RUNS / "teacher")
        cfg, params = fn(lm.config, lm.params)
        LM(cfg, params, lm.tokenizer).save(dst, overwrite=True)
    return dst


def main():
    from jaxlm.classify import package_task
    from jaxlm.compress.lowrank import factorize
    from jaxlm.compress.prune import apply_masks, magnitude_masks, prune_heads
    from jaxlm.compress.quantize import quantize_int8

    RUNS.mkdir(parents=True, exist_ok=True)
    if not (TEACHER / "checkpoints" / "400").is_dir():
        log("training the teacher (configs/teacher.yaml)")
        train(load_config(ROOT / "configs/teacher.yaml"), log=log)
    if not (RUNS / "teacher" / "config.json").exists():
        jaxlm.load(TEACHER).save(RUNS / "teacher", overwrite=True)
    rows = [measure("teacher (float32)", RUNS / "teacher")]

    q = transform("int8", quantize_int8)
    free, forced = greedy_agreement(jaxlm.load(RUNS / "teacher"), jaxlm.load(q))
    rows.append(measure("int8 weight-only", q, extra={"agree_free": free, "agree_forced": forced}))
    rows.append(measure("low-rank MLP (rank 64)", transform(
        "lowrank64", lambda c, p: factorize(c, p, targets="up,down", rank=64))))
    rows.append(measure("50% pruned, one shot", transform(
        "pruned50", lambda c, p: (c, apply_masks(p, magnitude_masks(p, 0.5))))))
    # Control for the fine-tuned rows: the same 100 extra steps without compression.
    run_train(RUNS / "teacher_ft", [f"adapt.init={RUNS / 'teacher'}", "train.steps=100", "optim.lr=5e-4",
                                    "optim.warmup_steps=10"])
    rows.append(measure("teacher + 100 steps (control)", RUNS / "teacher_ft"))
    run_train(RUNS / "pruned50_ft", [f"adapt.init={RUNS / 'teacher'}", "prune.sparsity=0.5", "prune.end=50",
                                      "prune.every=10", "train.steps=100", "optim.lr=5e-4", "optim.warmup_steps=10"])
    rows.append(measure("50% pruned, gradual + 100 steps", RUNS / "pruned50_ft"))
    heads = transform("heads3", lambda c, p: prune_heads(c, p, 3)[:2])
    rows.append(measure("3 of 6 heads, one shot", heads))
    run_train(RUNS / "heads3_ft", [f"adapt.init={heads}", "train.steps=100", "optim.lr=5e-4", "optim.warmup_steps=10"])
    rows.append(measure("3 of 6 heads + 100 steps", RUNS / "heads3_ft"))
    run_train(RUNS / "student", STUDENT)
    rows.append(measure("student 4L d128, 300 steps", RUNS / "student"))
    run_train(RUNS / "student_kd", [*STUDENT, "train.objective=distill", f"distill.teacher={RUNS / 'teacher'}",
                                    "distill.temperature=2", "distill.alpha=0.5"])
    rows.append(measure("same student, distilled", RUNS / "student_kd"))

    # 108 bytes of text per row: a 20-vector soft prompt fits the 128-position context beside it.
    domain = [*DOMAIN, "data.seq_len=108"]
    adapt = [measure("teacher on idlelib (no adaptation)", RUNS / "teacher", data=domain)]
    common = [*domain, f"adapt.init={RUNS / 'teacher'}", "train.steps=100", "optim.warmup_steps=10"]
    for name, method, lr, trained in [("LoRA r8 q,v", "lora", "3e-3", None), ("prompt tuning, 20 vectors", "prompt", "3e-2", None),
                                      ("full fine-tuning", "full", "5e-4", None)]:
        work = RUNS / f"idlelib_{method}"
        run_train(work, [*common, f"adapt.method={method}", f"optim.lr={lr}"])
        lm = jaxlm.load(work)
        from jaxlm.compress import tree
        from jaxlm.compress.adapt import trainable

        n_trained = tree.count_params(tree.split(lm.params, trainable(method))[0])
        adapt.append(measure(f"{name}, 100 steps", work, data=domain, trained=n_trained))

    task = RUNS / "package_task"
    info = package_task(task)
    cls = RUNS / "bert_packages"
    run_train(cls, ["model=bert-tiny", "model.d_model=128", "model.n_layers=4", "model.n_heads=4",
                    "model.max_len=128", f"data.path={task}", "train.objective=classify", "train.steps=400",
                    "optim.lr=1e-3", "optim.warmup_steps=40", "data.batch_size=32"])
    ev = evaluate_model(cls)
    classify = {"train": info["train"], "validation": ev["examples"], "classes": len(info["labels"]),
                "accuracy": ev["accuracy"], "macro_f1": ev["macro_f1"], "majority": ev["majority_baseline"]}
    (RUNS / "classify.json").write_text(json.dumps(classify))
    tok_s = speeds({r["name"]: r["path"] for r in rows + adapt[1:]})
    for r in rows + adapt:
        r["tok_s"] = tok_s.get(r["name"], tok_s.get("teacher (float32)"))
    print_tables(rows, adapt, classify)


def print_tables(rows, adapt, classify):
    def fmt(r, base):
        trained = f" ({r['trained']:,})" if r.get("trained") else ""
        loss = f"{r['val_loss']:.3f}" if r.get("val_loss") is not None else "-"
        tok = f"{r['tok_s']:.0f}" if r.get("tok_s") else "-"
        return (f"| {r['name']} | {r['params']:,}{trained} | {r['bytes'] / 2**20:.2f} MiB "
                f"({r['bytes'] / base['bytes']:.0%}) | {loss} | {tok} |")

    print("| model | parameters (trained) | parameters on disk | validation loss | tokens/s, batch 1 |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(fmt(r, rows[0]))
    q = next(r for r in rows if "agree_free" in r)
    print(f"\nint8 greedy agreement with float32 over {len(PROMPTS)} prompts x 32 tokens: "
          f"{q['agree_free']:.1%} of positions free-running, {q['agree_forced']:.1%} teacher-forced")
    print("\n| adaptation to idlelib | parameters (trained) | saved | validation loss on idlelib | tokens/s |")
    print("|---|---|---|---|---|")
    for r in adapt:
        print(fmt(r, adapt[0]))
    c = classify
    print(f"\nPackage classification ({c['classes']} packages, {c['train']} training / {c['validation']} validation "
          f"pieces): accuracy {c['accuracy']:.3f}, macro-F1 {c['macro_f1']:.3f}; majority class {c['majority']:.3f}")


if __name__ == "__main__":
    main()
