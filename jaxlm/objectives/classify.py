"""Sequence classification (``train.objective=classify``): a head over the training labels, the
cross-entropy of each example's class; evaluation adds a confusion matrix for macro-F1."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxlm.classify import ClassRows, label_names, read_examples
from jaxlm.objectives import register
from jaxlm.objectives.base import Objective, token_nll


@register
@dataclasses.dataclass(frozen=True)
class Classify(Objective):
    """Rows {"ids", "mask": [B, T], "label": [B]}; one example per row, every one scored."""

    name = "classify"
    packings = ()

    @classmethod
    def model_config(cls, cfg, tokenizer, log):
        """(cfg with a classification head over the training labels, (train rows, validation rows))."""
        train_ex = read_examples(cfg.data, "train")
        names = label_names(train_ex)
        cfg = dataclasses.replace(cfg, model=cfg.model.replace(
            head="classify", num_labels=len(names), label_names=names, pooler=cfg.model.pooler or not cfg.model.causal))
        rows = tuple(ClassRows(ex, tokenizer, names, cfg.data.seq_len)
                     for ex in (train_ex, read_examples(cfg.data, "validation")))
        log(f"classes: {', '.join(names)}; {len(rows[0])} training and {len(rows[1])} validation examples")
        return cfg, rows

    @classmethod
    def claims(cls, model_config) -> bool:
        return model_config.head == "classify"

    def rows(self, cfg, split, tokenizer, *, evaluation=False, template=None, prepared=None, log=None):
        if prepared is not None:  # read by model_config
            return prepared[0 if split == "train" else 1]
        names = cfg.model.label_names or tuple(str(i) for i in range(cfg.model.num_labels))
        return ClassRows(read_examples(cfg.data, split), tokenizer, names, cfg.data.seq_len)

    def eval_batches(self, n_rows, batch_size, requested, *, report=False):
        return n_rows // batch_size  # every full batch: the metrics cover the split

    def loss_sums(self, model, rows, *, key=None, mask_key=None, second=None):
        logits = model(rows["ids"], rows["mask"], key=key)  # [B, C]
        nll, target_logit = token_nll(logits, rows["label"])
        correct = (target_logit >= jax.lax.stop_gradient(logits.max(-1))).astype(jnp.float32)
        n = jnp.float32(nll.shape[0])
        return nll.sum(), n, {"accuracy": (correct.sum(), n)}

    def eval_sums(self, model, rows, *, mask_key, second=None) -> tuple:
        """The loss sums and a confusion matrix [true, predicted] (macro-F1)."""
        c = model.config.num_labels
        pred = jnp.argmax(model(rows["ids"], rows["mask"]), axis=-1)
        confusion = jax.nn.one_hot(rows["label"], c).T @ jax.nn.one_hot(pred, c)
        return (*self.loss_sums(model, rows), confusion)

    def eval_metrics(self, totals) -> dict:
        return {"macro_f1": totals.macro_f1}

    def report(self, totals) -> dict:
        return {"examples": int(totals.count), "accuracy": totals.accuracy, "macro_f1": totals.macro_f1,
                "majority_baseline": totals.majority_baseline}
