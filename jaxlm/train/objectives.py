"""Training objectives as sums over tokens: causal LM, masked LM, classification, distillation,
supervised fine-tuning on weighted (assistant / completion) tokens, and DPO over preference pairs.

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
    # clm / mlm with data.packing=segments: an EOS input starts a new segment (no attention across)
    segments_eos: int | None = None
    # objective=dpo
    beta: float = 0.1
    sft_weight: float = 0.0


def token_nll(logits, targets):
    """-log p(target) per token [B, T] (logsumexp - target logit)."""
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return jax.nn.logsumexp(logits, axis=-1) - target_logit, target_logit


def segments_from_eos(inputs, eos: int):
    """Segment ids [B, T] of an EOS-separated row: each EOS opens a segment (it stands in for the
    next document's BOS), so no document attends to another and positions restart at each."""
    return jnp.cumsum(inputs == eos, axis=1, dtype=jnp.int32) + 1


def forward(model, inputs, segments=None, key=None):
    """Logits of rows, with segment ids when examples are packed. A soft-prompted model cannot
    isolate packed examples (they would share the prompt), so its rows hold one example each
    (data.packing=pad) and the segment ids serve as the padding mask."""
    if segments is None:
        return model(inputs, key=key)
    if model.config.prompt_length:
        return model(inputs, segments > 0, key=key)
    return model(inputs, key=key, segment_ids=segments)


def sequence_logps(model, rows):
    """(sum of log p over weighted tokens, their NLL sum, their count), each [B, 2], of DPO pairs:
    rows {"inputs", "targets", "weights", "segments"} of [B, 2, T] (chosen, rejected)."""
    flat = {k: v.reshape(-1, v.shape[-1]) for k, v in rows.items()}
    nll, _ = token_nll(forward(model, flat["inputs"], flat["segments"]), flat["targets"])
    w = flat["weights"].astype(jnp.float32)
    shape = rows["weights"].shape[:2]
    s = (nll * w).sum(-1).reshape(shape)
    return -s, s, w.sum(-1).reshape(shape)


def dpo_sums(model, reference, rows, beta: float, sft_weight: float = 0.0):
    """DPO (Rafailov et al. 2023): -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))) per pair,
    with sequence log-probs over the response tokens only; ``sft_weight`` adds that times the
    chosen response's mean token NLL (RPO, Pang et al. 2024: it keeps the chosen responses likely,
    which plain DPO lets fall). Returns (loss sum, pairs, stats)."""
    pi, nll, count = sequence_logps(model, rows)
    ref = jax.lax.stop_gradient(sequence_logps(reference, rows)[0])
    rewards = beta * (pi - ref)  # [B, 2]: implicit rewards of chosen, rejected
    margin = rewards[:, 0] - rewards[:, 1]
    real = (count[:, 0] > 0).astype(jnp.float32)  # empty rows (padding a small split) count for nothing
    n = real.sum()
    stats = {"reward_accuracy": (((margin > 0) * real).sum(), n), "reward_margin": ((margin * real).sum(), n),
             "chosen_loss": (nll[:, 0].sum(), count[:, 0].sum())}
    loss = -jax.nn.log_sigmoid(margin)
    if sft_weight:
        loss = loss + sft_weight * nll[:, 0] / jnp.maximum(count[:, 0], 1.0)
    return (loss * real).sum(), n, stats


def loss_sums(model, rows, spec: StepSpec, *, key=None, mask_key=None, teacher=None, reference=None):
    """(sum of losses, number of scored tokens or examples, stats) for one batch; ``stats`` maps a
    metric name to (numerator sum, denominator sum), so micro-batches and hosts add up exactly.

    rows: [B, T + 1] token rows (clm, mlm, distill); {"inputs", "targets", "weights", "segments"}
    of [B, T] (sft: loss on weighted tokens only, examples packed by segment) or [B, 2, T] (dpo,
    with the frozen ``reference`` model); {"ids", "mask", "label"} (classify). ``key`` turns dropout
    on (not under dpo: its sequence log-probs are compared with the reference's without dropout);
    ``mask_key`` draws the MLM masks. The token loss is the NLL of the true token, or with
    ``teacher`` (a model, objective=distill) the distillation loss; the attention term is added as
    its mean times the number of scored tokens.
    """
    if spec.objective == "classify":  # rows: {"ids", "mask": [B, T], "label": [B]}
        logits = model(rows["ids"], rows["mask"], key=key)  # [B, C]
        nll, target_logit = token_nll(logits, rows["label"])
        correct = (target_logit >= jax.lax.stop_gradient(logits.max(-1))).astype(jnp.float32)
        n = jnp.float32(nll.shape[0])
        return nll.sum(), n, {"accuracy": (correct.sum(), n)}
    if spec.objective == "dpo":
        return dpo_sums(model, reference, rows, spec.beta, spec.sft_weight)
    segments = None
    if spec.objective == "sft":
        inputs, targets, segments = rows["inputs"], rows["targets"], rows["segments"]
        weights = rows["weights"].astype(jnp.float32)
    elif spec.objective == "clm" or (spec.objective == "distill" and model.config.causal):
        inputs, targets = rows[:, :-1], rows[:, 1:]
        weights = jnp.ones(targets.shape, jnp.float32)
    else:
        targets = rows[:, :-1]
        inputs, selected = mlm_inputs(targets, mask_key, vocab_size=model.config.vocab_size,
                                      mask_id=spec.mask_id, prob=spec.mlm_prob, special_ids=spec.special_ids)
        weights = selected.astype(jnp.float32)
    if spec.segments_eos is not None and segments is None:
        segments = segments_from_eos(rows[:, :-1], spec.segments_eos)
    extra = 0.0
    if teacher is None:
        # nll = logsumexp - target logit (argmax is slow on CPU: "correct" compares with the max).
        logits = forward(model, inputs, segments, key)
        per_token, target_logit = token_nll(logits, targets)
    else:
        seg = dict(segment_ids=segments)
        if spec.attention_weight > 0:
            h, maps = model.hidden_states(inputs, key=key, need_probs=True, **seg)
            t_h, t_maps = teacher.hidden_states(inputs, need_probs=True, **seg)
            extra = spec.attention_weight * distill.attention_mse(maps, t_maps, spec.layer_pairs) * weights.sum()
        else:
            h, t_h = model.hidden_states(inputs, key=key, **seg), teacher.hidden_states(inputs, **seg)
        logits = model.head(h)
        per_token = distill.token_losses(logits, teacher.head(t_h), targets, temperature=spec.temperature,
                                         alpha=spec.alpha)
        target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    correct = (target_logit >= jax.lax.stop_gradient(logits.max(-1))).astype(jnp.float32)
    n = weights.sum()
    return (per_token * weights).sum() + extra, n, {"accuracy": ((correct * weights).sum(), n)}
