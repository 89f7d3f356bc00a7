"""The engine's speculative decode step: every slot advances by 1 to K + 1 tokens per step.

A draft model (its own KV cache, one row per slot) or prompt lookup proposes K tokens after each
slot's pending token; the target checks all of them in one cached pass and ``speculative.accept``
keeps what its own distribution allows. Rows mix greedy and sampled settings (per-row arrays, as in
the plain step): a greedy row's distributions are one-hot, which makes the rule greedy
verification. Keys follow ``speculative.round_keys`` with the slot's step count as the round, so a
request gets the tokens ``lm.generate([prompt], draft=..., speculate_k=K, seed=s)`` gives.

Slots are the engine's: a slot index is also the token's position (the soft prompt included), the
pending token sits at slot ``length`` (its keys not yet in the caches), and the caches and history
hold K + 2 slots past ``max_len`` for a round's overshoot, whose tokens are never committed.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm import kernels
from jaxlm.generate import inverse_cdf, token_logprobs
from jaxlm.speculative import (accept, draft_proposals, prompt_lookup, proposal_uniform, round_block, round_keys,
                               round_uniforms, row_probs)


def _clamp(pos, model):
    """Positions past the model's context occur only for overshoot tokens (never committed)."""
    return jnp.minimum(pos, model.config.max_len - 1)


def _draft_proposals(draft, d_cache, hist, length, shift, rows, keys, k: int):
    """``speculative.draft_proposals`` at the engine's slots: (proposals [B, K], the distributions
    they were drawn from [B, K, V] (one-hot for greedy rows), the draft's cache). ``shift``: the
    draft's slot minus the target's (their soft prompts differ)."""
    b, s = hist.shape[0], jax.tree.leaves(d_cache)[0].shape[-2]
    valid = jnp.ones((b, s), bool)  # causal by slot: a query sees only slots written before it
    idx = length[:, None] - 1 + jnp.arange(2)
    first = (jnp.take_along_axis(hist, idx, axis=1), _clamp(idx + shift, draft), length - 1 + shift)

    def at(j):
        slot = length + 1 + j + shift
        return _clamp(slot, draft)[:, None], slot

    def pick(logits, j):
        q = row_probs(logits, *rows)
        tok = jnp.where(rows[0] > 0, inverse_cdf(q, proposal_uniform(keys, j)),
                        jnp.argmax(logits, axis=-1).astype(jnp.int32))
        return tok, q

    return draft_proposals(draft, d_cache, valid, first, at, pick, k)


@functools.partial(kernels.jit, static_argnames=("t_graph", "d_graph", "k"), donate_argnums=(4,))
def speculative_step(t_graph, t_params, d_graph, d_params, state, active, *, k: int):
    """One round for every slot (inactive ones run too and are ignored). ``d_graph`` None: prompt
    lookup. Returns (state, (tokens [B, K + 1], counts [B], accepted proposals [B], logprob,
    top ids, top logprobs, each [B, K + 1, ...])): slot b commits tokens[b, :counts[b]] (0 for an
    idle slot), the first accepted[b] of them the draft's."""
    target = nnx.merge(t_graph, t_params)
    length, hist, step = state["length"], state["hist"], state["step"]
    b = hist.shape[0]
    # Idle slots count as greedy: a finished sampled request must not keep the sampling path on.
    rows = (jnp.where(active, state["temperature"], 0.0), state["top_k"], state["top_p"])
    k_draft, k_accept, k_final = round_keys(state["key"], step)
    soft = target.config.prompt_length
    d_cache = state.get("d_cache")
    if d_graph is None:
        d, q = prompt_lookup(hist, jnp.full((b,), soft), length + 1, k), None
    else:
        draft = nnx.merge(d_graph, d_params)
        d, q, d_cache = _draft_proposals(draft, d_cache, hist, length, draft.config.prompt_length - soft, rows,
                                         k_draft, k)
    idx = length[:, None] + jnp.arange(k + 1)
    ids = jnp.concatenate([jnp.take_along_axis(hist, length[:, None], axis=1), d], axis=1)
    s = jax.tree.leaves(state["cache"])[0].shape[-2]
    h, cache = target.decode(ids, _clamp(idx, target), state["cache"], length, jnp.ones((b, s), bool))
    logits = target.head(h)  # [B, K + 1, V]
    a, x = accept(row_probs(logits, *rows), d, q, round_uniforms(k_accept, k), jax.vmap(jax.random.uniform)(k_final))
    block = round_block(d, a, x)
    hist = jax.vmap(lambda row, blk, at: jax.lax.dynamic_update_slice(row, blk, (at,)))(hist, block, length + 1)
    m = jnp.where(active, a + 1, 0)
    v = logits.shape[-1]
    want = jnp.repeat(state["want"] & active, k + 1)
    lp, top_ids, top_lp = token_logprobs(logits.reshape(b * (k + 1), v), block.reshape(-1), want)
    state = dict(state, cache=cache, hist=hist, length=length + m, step=step + active)
    if d_cache is not None:
        state["d_cache"] = d_cache
    return state, (block, m, a, lp.reshape(b, k + 1), top_ids.reshape(b, k + 1, -1),
                   top_lp.reshape(b, k + 1, -1))
