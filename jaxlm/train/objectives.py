"""Training objectives as sums over tokens: causal LM, masked LM, classification, distillation.

Dimension legend: B batch rows, T length, V vocab, C classes.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxlm.compress import distill


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


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """Static settings of the jitted steps."""

    objective: str
    grad_accum: int = 1
    seed: int = 0
    mask_id: int | None = None
    special_ids: tuple = ()  # never masked (tokenizer.special_ids)
    mlm_prob: float = 0.15
    # objective=distill (see jaxlm/compress/distill.py)
    temperature: float = 2.0
    alpha: float = 0.5
    attention_weight: float = 0.0
    layer_pairs: tuple = ()


def loss_sums(model, rows, spec: StepSpec, *, key=None, mask_key=None, teacher=None):
    """(sum of token losses, number of scored tokens, number predicted right) for rows [B, T + 1].

    ``key`` turns dropout on; ``mask_key`` draws the MLM masks. The token loss is the NLL of the
    true token, or with ``teacher`` (a model, objective=distill) the distillation loss; the
    attention term is added as its mean times the number of scored tokens.
    """
    if spec.objective == "classify":  # rows: {"ids", "mask": [B, T], "label": [B]}
        logits = model(rows["ids"], rows["mask"], key=key)  # [B, C]
        target_logit = jnp.take_along_axis(logits, rows["label"][:, None], axis=-1)[:, 0]
        nll = jax.nn.logsumexp(logits, axis=-1) - target_logit
        correct = (target_logit >= jax.lax.stop_gradient(logits.max(-1))).astype(jnp.float32)
        return nll.sum(), jnp.float32(nll.shape[0]), correct.sum()
    causal = spec.objective == "clm" or (spec.objective == "distill" and model.config.causal)
    if causal:
        inputs, targets = rows[:, :-1], rows[:, 1:]
        weights = jnp.ones(targets.shape, jnp.float32)
    else:
        targets = rows[:, :-1]
        inputs, selected = mlm_inputs(targets, mask_key, vocab_size=model.config.vocab_size,
                                      mask_id=spec.mask_id, prob=spec.mlm_prob, special_ids=spec.special_ids)
        weights = selected.astype(jnp.float32)
    extra = 0.0
    if teacher is None:
        logits = model(inputs, key=key)
        # nll = logsumexp - target logit (argmax is slow on CPU: "correct" compares with the max).
        target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
        per_token = jax.nn.logsumexp(logits, axis=-1) - target_logit
    else:
        if spec.attention_weight > 0:
            h, maps = model.hidden_states(inputs, key=key, need_probs=True)
            t_h, t_maps = teacher.hidden_states(inputs, need_probs=True)
            extra = spec.attention_weight * distill.attention_mse(maps, t_maps, spec.layer_pairs) * weights.sum()
        else:
            h, t_h = model.hidden_states(inputs, key=key), teacher.hidden_states(inputs)
        logits = model.head(h)
        per_token = distill.token_losses(logits, teacher.head(t_h), targets, temperature=spec.temperature,
                                         alpha=spec.alpha)
        target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    correct = (target_logit >= jax.lax.stop_gradient(logits.max(-1))).astype(jnp.float32)
    return (per_token * weights).sum() + extra, weights.sum(), (correct * weights).sum()
