"""Looking at runs: loss curves as a PNG, and evaluation of any loadable model on a data split."""

from __future__ import annotations

import json
import math
from pathlib import Path

import jax

from jaxlm.api import load
from jaxlm.classify import ClassRows, read_examples
from jaxlm.config import load_config
from jaxlm.data import packed_rows
from jaxlm.instruct import chat_template, example_rows
from jaxlm.io import is_workdir
from jaxlm.sharding import batch_sharding, check_batch_fits, make_mesh
from jaxlm.train import StepSpec, check_seq_len, evaluate, make_eval_step


def read_metrics(workdir) -> list[dict]:
    path = Path(workdir, "metrics.jsonl")
    if not path.is_file():
        raise FileNotFoundError(f"{workdir} has no metrics.jsonl (not a training workdir?)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_losses(workdir, output=None) -> Path:
    """Training loss per step and validation loss per evaluation, written as a PNG."""
    import matplotlib  # heavy: only for plots

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(workdir)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss", lw=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per token)")
    ax.set_title(str(Path(workdir).name))
    ax.grid(alpha=0.3)
    ax.legend()
    out = Path(output or Path(workdir, "loss.png"))
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def evaluate_model(model_path, overrides=(), *, split: str = "validation", batches: int = 16) -> dict:
    """{"loss", "perplexity", "tokens", ["accuracy"]} of a model on a split of its data config (a
    workdir's own, else the defaults with ``overrides``), by the training run's own evaluation."""
    workdir = is_workdir(model_path)
    cfg = load_config(Path(model_path, "config.json") if workdir else None, overrides)
    # A mesh only when asked for (mesh.*=...): the run's own mesh may not exist on this machine.
    mesh = make_mesh(cfg.mesh) if any(o.startswith("mesh.") for o in overrides) else None
    if mesh is not None:
        check_batch_fits(cfg.data.batch_size, mesh)
    lm = load(model_path, mesh=mesh)
    tokenizer = lm.tokenizer
    if tokenizer is None:
        raise ValueError(f"{model_path} has no tokenizer files, so no text can be evaluated")
    if lm.config.head == "classify":
        objective = "classify"
    elif workdir or any(o.startswith("train.objective=") for o in overrides):
        if cfg.train.objective == "dpo":
            raise ValueError("jaxlm eval scores clm / mlm / sft / classify; a dpo run's held-out reward accuracy "
                             "is in its metrics.jsonl (val_reward_accuracy), its loss on the chosen responses "
                             "with train.objective=sft data.path=SFT_DATA")
        objective = cfg.train.objective if cfg.train.objective in ("clm", "mlm", "sft") else \
            ("clm" if lm.config.causal else "mlm")  # a distilled student: its own loss
    else:
        objective = "clm" if lm.config.causal else "mlm"
    check_seq_len(cfg.data.seq_len, lm.config.context)
    if objective == "classify":
        names = lm.config.label_names or tuple(str(i) for i in range(lm.config.num_labels))
        rows = ClassRows(read_examples(cfg.data, split), tokenizer, names, cfg.data.seq_len)
        n = len(rows) // cfg.data.batch_size  # every full batch: classification metrics cover the split
    elif objective == "sft":  # every example: the loss over its learned (completion / assistant) tokens
        rows = example_rows(cfg.data, split, tokenizer, "sft", template=chat_template(cfg.data, tokenizer))
        rows = rows.padded(cfg.data.batch_size)
        n = len(rows) // cfg.data.batch_size
    else:
        rows = packed_rows(cfg.data, split, tokenizer)
        n = min(batches, max(1, len(rows) // cfg.data.batch_size))
    segments = cfg.data.packing == "segments" and objective in ("clm", "mlm")
    spec = StepSpec(objective, seed=cfg.train.seed, mask_id=tokenizer.mask_id, special_ids=tokenizer.special_ids,
                    mlm_prob=cfg.train.mlm_prob, segments_eos=tokenizer.eos_id if segments else None)
    sharding = None if mesh is None else batch_sharding(mesh)
    totals = evaluate(make_eval_step(lm.graphdef, spec), lm.params, rows, batch_size=cfg.data.batch_size,
                      batches=n, to_device=lambda local: jax.device_put(local, sharding))
    out = {"model": str(model_path), "split": split, "objective": objective, "loss": totals.loss}
    if objective == "classify":
        out.update(examples=int(totals.count), accuracy=totals.accuracy, macro_f1=totals.macro_f1,
                   majority_baseline=totals.majority_baseline)
        return out
    out.update(perplexity=math.exp(totals.loss), tokens=int(totals.count))
    if objective == "mlm":
        out["accuracy"] = totals.accuracy
    return out
