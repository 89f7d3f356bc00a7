"""The one evaluation routine, used by the training loop's eval hook and by ``jaxlm eval``."""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxlm.classify import macro_f1
from jaxlm.data import loader


@dataclasses.dataclass(frozen=True)
class EvalTotals:
    """Sums over the evaluated batches: token (or example) losses, how many were scored, how many
    predicted right, and for classification the confusion matrix [true, predicted]."""

    loss_sum: float
    count: float
    correct: float
    confusion: np.ndarray | None = None

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.count, 1)

    @property
    def accuracy(self) -> float:
        return self.correct / max(self.count, 1)

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
    tot, confusion = np.zeros(3), None
    for i in range(batches):
        out = eval_step(params, to_device(next(it)), i)
        tot += np.array([float(x) for x in out[:3]])
        if len(out) > 3:
            confusion = np.asarray(out[3]) + (0 if confusion is None else confusion)
    return EvalTotals(tot[0], tot[1], tot[2], confusion)
