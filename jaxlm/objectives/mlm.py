"""Masked language modelling (``train.objective=mlm``, BERT): masked tokens of packed rows are
predicted from both sides."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxlm.objectives import register
from jaxlm.objectives.clm import CLM


def mlm_inputs(tokens, key, *, vocab_size: int, mask_id: int, prob: float, special_ids=()):
    """BERT masking: select ``prob`` of the non-special tokens; of those 80% -> mask_id, 10% -> a
    random token, 10% unchanged. Returns (inputs, selected [B, T] bool)."""
    k_sel, k_kind, k_rand = jax.random.split(key, 3)
    special = jnp.zeros(tokens.shape, bool)
    for s in special_ids:
        special = special | (tokens == s)
    selected = jax.random.bernoulli(k_sel, prob, tokens.shape) & ~special
    kind = jax.random.uniform(k_kind, tokens.shape)
    random_tokens = jax.random.randint(k_rand, tokens.shape, 0, vocab_size)
    inputs = jnp.where(selected & (kind < 0.8), mask_id, tokens)
    inputs = jnp.where(selected & (kind >= 0.8) & (kind < 0.9), random_tokens, inputs)
    return inputs, selected


@register
@dataclasses.dataclass(frozen=True)
class MLM(CLM):
    """Rows [B, T + 1] (the last column unused): the tokens [:, :-1], ``prob`` of them masked
    (``mlm_inputs``) and scored; special tokens are never masked."""

    name = "mlm"
    mask_id: int | None = None
    special_ids: tuple = ()  # never masked (tokenizer.special_ids)
    prob: float = 0.15

    @classmethod
    def check(cls, cfg, tokenizer) -> None:
        super().check(cfg, tokenizer)
        needs_mask(cfg, tokenizer)

    @classmethod
    def from_run(cls, cfg, tokenizer, second):
        return cls(segments_eos=tokenizer.eos_id if cls.packing(cfg) == "segments" else None,
                   mask_id=tokenizer.mask_id, special_ids=tokenizer.special_ids, prob=cfg.train.mlm_prob)

    def report(self, totals) -> dict:
        return {**super().report(totals), "accuracy": totals.accuracy}

    def tokens(self, model, rows, mask_key):
        targets = rows[:, :-1]
        inputs, selected = mlm_inputs(targets, mask_key, vocab_size=model.config.vocab_size, mask_id=self.mask_id,
                                      prob=self.prob, special_ids=self.special_ids)
        return inputs, targets, selected.astype(jnp.float32), super().tokens(model, rows, mask_key)[3]


def needs_mask(cfg, tokenizer) -> None:
    if tokenizer.mask_id is None:
        raise ValueError(f"train.objective={cfg.train.objective} on an encoder needs a tokenizer with a mask token")
