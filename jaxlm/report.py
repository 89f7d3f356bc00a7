"""Looking at runs: loss curves as a PNG, and evaluation of any loadable model on a data split."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import jax

from jaxlm import objectives
from jaxlm.api import load
from jaxlm.config import load_config
from jaxlm.instruct import chat_template
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
    asked = workdir or any(o.startswith("train.objective=") for o in overrides)
    objective = objectives.scoring(cfg.train.objective if asked else None, lm.config)
    check_seq_len(cfg.data.seq_len, lm.config.context)
    cfg = dataclasses.replace(cfg, model=lm.config)
    scorer = objective.from_run(cfg, tokenizer, None)
    template = chat_template(cfg.data, tokenizer) if objective.chat else None
    rows = scorer.rows(cfg, split, tokenizer, evaluation=True, template=template)
    n = scorer.eval_batches(len(rows), cfg.data.batch_size, batches, report=True)
    sharding = None if mesh is None else batch_sharding(mesh)
    totals = evaluate(make_eval_step(lm.graphdef, StepSpec(scorer, seed=cfg.train.seed)), lm.params, rows,
                      batch_size=cfg.data.batch_size, batches=n, to_device=lambda local: jax.device_put(local, sharding))
    return {"model": str(model_path), "split": split, "objective": objective.name, "loss": totals.loss,
            **scorer.report(totals)}
