"""The one evaluation routine, used by the training loop's eval hook and by ``jaxlm eval``."""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxlm.classify import macro_f1
from jaxlm.data import loader


@dataclasses.dataclass(frozen=True)
class EvalTotals:
    """Sums over the evaluated batches: token (or example / pair) losses, how many were scored,
    each stat's (numerator, denominator) (``loss_sums``), and for classification the confusion
    matrix [true, predicted]."""

    loss_sum: float
    count: float
    stats: dict = dataclasses.field(default_factory=dict)
    confusion: np.ndarray | None = None

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.count, 1)

    def ratio(self, name: str) -> float:
        num, den = self.stats[name]
        return num / max(den, 1)

    @property
    def metrics(self) -> dict:
        """{name: ratio} of every stat (accuracy; reward_accuracy, reward_margin, chosen_loss for dpo)."""
        return {k: self.ratio(k) for k in self.stats}

    @property
    def accuracy(self) -> float:
        return self.ratio("accuracy")

    @property
    def macro_f1(self) -> float:
        return macro_f1(self.confusion)

    @property
    def majority_baseline(self) -> float:
        """The accuracy of always predicting the most frequent true class."""
        counts = np.asarray(self.confusion).sum(1)
        return float(counts.max() / max(counts.sum(), 1))


def evaluate(eval_step, params, rows, *, batch_size: int, batches: int, to_device,
             process_index: int = 0, process_count: int = 1) -> EvalTotals:
    """Run ``eval_step`` (``steps.make_eval_step``) over the first ``batches`` batches of ``rows``
    in order (no shuffling: every evaluation sees the same rows and MLM masks)."""
    it = loader(rows, batch_size=batch_size, seed=0, shuffle=False, process_index=process_index,
                process_count=process_count)
    loss_sum, count, stats, confusion = 0.0, 0.0, {}, None
    for i in range(batches):
        out = eval_step(params, to_device(next(it)), i)
        loss_sum, count = loss_sum + float(out[0]), count + float(out[1])
        for k, (num, den) in out[2].items():
            a, b = stats.get(k, (0.0, 0.0))
            stats[k] = (a + float(num), b + float(den))
        if len(out) > 3:
            confusion = np.asarray(out[3]) + (0 if confusion is None else confusion)
    return EvalTotals(loss_sum, count, stats, confusion)
