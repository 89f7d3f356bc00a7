"""Looking at runs: loss curves as a PNG, and evaluation of any loadable model on a data split."""

from __future__ import annotations

import json
import math
from pathlib import Path


def read_metrics(workdir) -> list[dict]:
    path = Path(workdir, "metrics.jsonl")
    if not path.is_file():
        raise FileNotFoundError(f"{workdir} has no metrics.jsonl (not a training workdir?)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_losses(workdir, output=None) -> Path:
    """Training loss per step and validation loss per evaluation, written as a PNG."""
    import matplotlib

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
    """{"loss", "perplexity", "tokens", ["accuracy"]} of a model on a split of its data config."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import jaxlm
    from jaxlm.checkpoint import is_workdir
    from jaxlm.config import load_config
    from jaxlm.data import loader
    from jaxlm.sharding import batch_sharding, check_batch_fits, make_mesh
    from jaxlm.train import StepSpec, _rows, check_seq_len, make_eval_step, tokenizer_tag

    workdir = is_workdir(model_path)
    cfg = load_config(Path(model_path, "config.json") if workdir else None, overrides)
    # A mesh only when asked for (mesh.*=...): the run's own mesh may not exist on this machine.
    mesh = make_mesh(cfg.mesh) if any(o.startswith("mesh.") for o in overrides) else None
    if mesh is not None:
        check_batch_fits(cfg.data.batch_size, mesh)
    lm = jaxlm.load(model_path, mesh=mesh)
    if lm.tokenizer is None:
        raise ValueError(f"{model_path} has no tokenizer files, so no text can be evaluated")
    if lm.config.head == "classify":
        objective = "classify"
    elif workdir or any(o.startswith("train.objective=") for o in overrides):
        objective = cfg.train.objective if cfg.train.objective in ("clm", "mlm") else \
            ("clm" if lm.config.causal else "mlm")  # a distilled student: its own loss
    else:
        objective = "clm" if lm.config.causal else "mlm"
    check_seq_len(cfg.data.seq_len, lm.config.context)
    tokenizer = lm.tokenizer
    if objective == "classify":
        from jaxlm.classify import ClassRows, macro_f1, read_examples

        names = lm.config.label_names or tuple(str(i) for i in range(lm.config.num_labels))
        rows = ClassRows(read_examples(cfg.data, split), tokenizer, names, cfg.data.seq_len)
        batches = len(rows)  # every full batch: classification metrics cover the split
    else:
        rows = _rows(cfg, split, tokenizer, tokenizer_tag(tokenizer), log=lambda m: None)
    spec = StepSpec(objective, mask_id=getattr(tokenizer, "mask_id", None),
                    special_ids=tuple(i for i in (tokenizer.eos_id, tokenizer.pad_id) if i is not None))
    step = make_eval_step(lm._graphdef, spec)  # the training run's own evaluation step

    it = loader(rows, batch_size=cfg.data.batch_size, seed=0, shuffle=False)
    n = min(batches, max(1, len(rows) // cfg.data.batch_size))
    tot, confusion = np.zeros(3), 0
    for i in range(n):
        local = next(it)
        batch = jax.tree.map(jnp.asarray, local) if mesh is None else \
            jax.tree.map(lambda x: jax.device_put(x, batch_sharding(mesh)), local)
        res = step(lm.params, batch, i)
        tot += np.array([float(x) for x in res[:3]])
        confusion = confusion + (np.asarray(res[3]) if len(res) > 3 else 0)
    loss = tot[0] / max(tot[1], 1)
    out = {"model": str(model_path), "split": split, "objective": objective, "loss": loss}
    if objective == "classify":
        counts = np.asarray(confusion).sum(1)
        out.update(examples=int(tot[1]), accuracy=tot[2] / max(tot[1], 1), macro_f1=macro_f1(confusion),
                   majority_baseline=float(counts.max() / max(counts.sum(), 1)))
        return out
    out.update(perplexity=math.exp(loss), tokens=int(tot[1]))
    if objective == "mlm":
        out["accuracy"] = tot[2] / max(tot[1], 1)
    return out
