"""Supervised fine-tuning (``train.objective=sft``): the loss on the learned (assistant /
completion) tokens of instruction examples (``instruct`` makes the rows)."""

from __future__ import annotations

import dataclasses

from jaxlm.instruct import example_rows
from jaxlm.objectives import register
from jaxlm.objectives.base import Objective, forward, token_nll, token_sums


@register
@dataclasses.dataclass(frozen=True)
class SFT(Objective):
    """Rows {"inputs", "targets", "weights", "segments"} of [B, T]: examples packed by segment
    (or one per row), the loss on weighted tokens only."""

    name = "sft"
    packings = ("segments", "pad")
    chat = True

    def rows(self, cfg, split, tokenizer, *, evaluation=False, template=None, prepared=None, log=None):
        rows = example_rows(cfg.data, split, tokenizer, pairs=False, packing=self.packing(cfg), template=template,
                            log=log, what="sft")
        return rows.padded(cfg.data.batch_size) if evaluation else rows

    def eval_batches(self, n_rows, batch_size, requested, *, report=False):
        # Small splits: each row once at most; jaxlm eval scores every example.
        return n_rows // batch_size if report else min(n_rows // batch_size, requested)

    def loss_sums(self, model, rows, *, key=None, mask_key=None, second=None):
        logits = forward(model, rows["inputs"], rows["segments"], key)
        targets = rows["targets"]
        return token_sums(logits, token_nll(logits, targets)[0], targets, rows["weights"].astype("float32"))
