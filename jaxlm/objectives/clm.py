"""Causal language modelling (``train.objective=clm``): each token of packed rows predicts the next."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from jaxlm.data import packed_rows
from jaxlm.objectives import register
from jaxlm.objectives.base import Objective, forward, segments_from_eos, token_nll, token_sums


@register
@dataclasses.dataclass(frozen=True)
class CLM(Objective):
    """Rows [B, T + 1] of token ids: inputs [:, :-1], targets [:, 1:], every token scored."""

    name = "clm"
    segments_eos: int | None = None  # data.packing=segments: an EOS input starts a new segment (no attention across)

    @classmethod
    def from_run(cls, cfg, tokenizer, second):
        return cls(segments_eos=tokenizer.eos_id if cls.packing(cfg) == "segments" else None)

    def rows(self, cfg, split, tokenizer, *, evaluation=False, template=None, prepared=None, log=None):
        return packed_rows(cfg.data, split, tokenizer, log)

    def tokens(self, model, rows, mask_key):
        """(inputs, targets, weights [B, T], segment ids or None) of rows [B, T + 1]."""
        segments = None if self.segments_eos is None else segments_from_eos(rows[:, :-1], self.segments_eos)
        return rows[:, :-1], rows[:, 1:], jnp.ones(rows[:, 1:].shape, jnp.float32), segments

    def loss_sums(self, model, rows, *, key=None, mask_key=None, second=None):
        inputs, targets, weights, segments = self.tokens(model, rows, mask_key)
        logits = forward(model, inputs, segments, key)
        return token_sums(logits, token_nll(logits, targets)[0], targets, weights)
