"""Speculative decoding inside one jitted loop: a cheap proposer guesses K tokens, the target model
checks all of them in one cached forward pass, and a rejection rule keeps the target's own
distribution exactly (Leviathan et al. 2023; Chen et al. 2023).

Dimension legend: B rows, P prompt length (bucketed), N new tokens, K proposals per round,
V vocab, H = P + N + K + 1 history slots (prompt, committed tokens, room for a round's overshoot).

A round, per row (rows advance by different amounts; all state is per row):
1. The proposer guesses d_1..d_K after the last committed token (the "pending" one, whose keys
   and values are not in the caches yet): a draft model (K cached steps, q_i its filtered
   distributions) or prompt lookup (the tokens that followed the latest earlier occurrence of the
   last 1-3 tokens; q_i is one-hot).
2. The target runs [pending, d_1..d_K] in one pass: p_0..p_K, its filtered distributions.
3. d_i is accepted with probability min(1, p_{i-1}(d_i) / q_i(d_i)) while all before it were; at
   the first rejection a replacement is drawn from normalise(max(0, p_{i-1} - q_i)); when all K
   pass, a bonus token from p_K. Greedy is the special case: d_i is accepted iff it is the target's
   argmax, and the replacement / bonus is the target's argmax.
4. The accepted tokens and the replacement (cut at EOS and at N) are committed. Caches "roll back"
   by position: the next round writes from the new pending slot on, and the causal mask never lets
   a query see the stale slots beyond it.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlm import kernels
from jaxlm.generate import (Sampling, filter_logits, init_cache, inverse_cdf, next_token, prompt_batch,
                            sampling_rows)
from jaxlm.transformer import positions_from_mask

LOOKUP_NGRAM = 3  # prompt lookup matches the last 3 tokens, then 2, then 1
DEFAULT_K = 4  # proposals per round when none is given
MAX_K = 32


@dataclasses.dataclass(frozen=True)
class SpeculationStats:
    """What a speculative call did: ``proposed`` and ``accepted`` draft tokens (over all rows),
    ``target_passes`` (rounds: forward passes of the target after the prompt), ``new_tokens``."""

    proposed: int
    accepted: int
    target_passes: int
    new_tokens: int

    @property
    def acceptance(self) -> float:
        return self.accepted / max(self.proposed, 1)

    @property
    def tokens_per_pass(self) -> float:
        """New tokens per target pass, per row (plain decoding makes 1)."""
        return self.new_tokens / max(self.target_passes, 1)

    def __str__(self):
        return (f"{self.accepted}/{self.proposed} proposals accepted ({100 * self.acceptance:.0f}%), "
                f"{self.tokens_per_pass:.2f} tokens per target pass")


def _take(x, idx):
    """x [B, L], idx [B, T] -> x[b, idx[b, t]]."""
    return jnp.take_along_axis(x, idx, axis=1)


def _fold(keys, i):
    """Each row's key [B] folded with i (one for all rows, or one per row [B])."""
    return jax.vmap(jax.random.fold_in)(keys, jnp.broadcast_to(i, keys.shape))


def _uniform(keys):
    return jax.vmap(jax.random.uniform)(keys)


def _filtered_probs(logits, rows):
    """Softmax of the temperature / top-k / top-p filtered logits: [..., V] with rows' [B] settings
    broadcast over the middle axes."""
    shape = logits.shape
    n = int(np.prod(shape[1:-1]))
    rep = [jnp.repeat(r, n) for r in rows]
    return jax.nn.softmax(filter_logits(logits.reshape(-1, shape[-1]), *rep), axis=-1).reshape(shape)


def row_probs(logits, temperature, top_k, top_p):
    """Like ``_filtered_probs`` with per-row greedy: logits [B, ..., V] -> the filtered softmax
    where a row's temperature > 0, one-hot at the argmax where it is 0 (so ``accept`` verifies
    greedy rows greedily). Rows of any mix run one program."""
    greedy = jax.nn.one_hot(jnp.argmax(logits, axis=-1), logits.shape[-1], dtype=jnp.float32)

    def mixed():
        sampled = (temperature > 0).reshape(-1, *[1] * (logits.ndim - 1))
        soft = _filtered_probs(logits, (jnp.where(temperature > 0, temperature, 1.0), top_k, top_p))
        return jnp.where(sampled, soft, greedy)

    return jax.lax.cond(jnp.all(temperature == 0), lambda: greedy, mixed)


def draft_proposals(draft, d_cache, valid, first, at, pick, k: int):
    """A draft model's K proposals of a round: (proposals [B, K], the distributions they were drawn
    from [B, K, V] (None when ``pick`` gives none), the draft's cache).

    first: (ids [B, 2], positions [B, 2], cache slot [B]) of the pending token and the one before
    it (a fully accepted round left that one unwritten); at(j): (positions [B, 1], cache slot [B])
    of proposal j; pick(logits [B, V], j): (proposal j [B], its distribution [B, V] or None). K - 1
    fed steps, then the K-th proposal from the last logits (its keys are written next round)."""
    h, d_cache = draft.decode(*first[:2], d_cache, first[2], valid)
    logits = draft.head(h[:, -1:])[:, 0]

    def step(carry, j):
        logits, d_cache = carry
        tok, q = pick(logits, j)
        pos, slot = at(j)
        h, d_cache = draft.decode(tok[:, None], pos, d_cache, slot, valid)
        return (draft.head(h)[:, 0], d_cache), (tok, q)

    (logits, d_cache), (toks, qs) = jax.lax.scan(step, (logits, d_cache), jnp.arange(k - 1))
    last, q = pick(logits, k - 1)
    toks = jnp.concatenate([jnp.moveaxis(toks, 0, 1), last[:, None]], 1)
    return toks, None if q is None else jnp.concatenate([jnp.moveaxis(qs, 0, 1), q[:, None]], 1), d_cache


def round_block(d, a, x):
    """[B, K + 1]: the accepted proposals d[:, :a], then x, then filler (never committed)."""
    return jnp.where(jnp.arange(d.shape[1] + 1) == a[:, None], x[:, None], jnp.concatenate([d, d[:, :1]], axis=1))


def round_keys(row_keys, i):
    """Round i's keys [B] (for the draft's proposals, the acceptance tests, the final draw): the
    schedule ``generate(draft=...)`` and the server share, so they draw the same tokens."""
    keys = _fold(row_keys, i)
    return tuple(_fold(keys, s) for s in range(3))


def proposal_uniform(draft_keys, j):
    """The uniform [B] the draft's j-th proposal of a round is drawn with."""
    return _uniform(_fold(draft_keys, j))


def round_uniforms(keys, k: int):
    """The K uniforms [B, K] a round's acceptance tests use, from each row's key [B]."""
    return jax.vmap(lambda key: jax.random.uniform(key, (k,)))(keys)


def accept(probs, d, q, u, u_final):
    """One round's rejection rule, per row: (accepted proposals a [B], the token after them x [B]).

    probs [B, K + 1, V]: the target's distributions p_0..p_K after the pending token and each
    proposal; d [B, K]: the proposals; q [B, K, V]: the distributions they were drawn from (None:
    one-hot, as prompt lookup's); u [B, K], u_final [B]: uniforms. d_i is accepted with probability
    min(1, p_{i-1}(d_i) / q_i(d_i)) while all before it were; x is drawn from normalise(max(0,
    p_a - q_{a+1})), or from p_K when all K pass. A one-hot p (a greedy row) makes this greedy
    verification: d_i passes iff it is the target's argmax, and x is the argmax."""
    k = d.shape[1]
    p_d = jnp.take_along_axis(probs[:, :k], d[..., None], axis=-1)[..., 0]
    if q is None:  # one-hot proposals (q(d) = 1)
        a = jnp.sum(jnp.cumprod(u < p_d, axis=1), axis=1)
        q_a = jnp.where((a < k)[:, None], jax.nn.one_hot(_take(d, jnp.minimum(a, k - 1)[:, None])[:, 0],
                                                         probs.shape[-1], dtype=probs.dtype), 0.0)
    else:
        q_d = jnp.take_along_axis(q, d[..., None], axis=-1)[..., 0]
        a = jnp.sum(jnp.cumprod(u * q_d < p_d, axis=1), axis=1)
        q_a = jnp.take_along_axis(jnp.concatenate([q, jnp.zeros_like(q[:, :1])], 1), a[:, None, None],
                                  axis=1)[:, 0]  # zeros past K: the bonus draws from p_K
    p_a = jnp.take_along_axis(probs, a[:, None, None], axis=1)[:, 0]
    residual = jnp.maximum(p_a - q_a, 0.0)
    residual = jnp.where(jnp.sum(residual, -1, keepdims=True) > 0, residual, p_a)
    return a, inverse_cdf(residual, u_final)


def prompt_lookup(hist, start, end, k: int, ngram: int = LOOKUP_NGRAM):
    """K proposals per row [B, K]: the tokens after the latest earlier occurrence of the row's last
    ``ngram`` tokens (else ngram - 1, ..., 1), continued periodically past the present; the last
    token repeated when nothing matches. hist [B, L]; real tokens at [start, end) per row."""
    b, length = hist.shape
    cont = jnp.full((b,), -1, jnp.int32)  # where the proposed continuation starts
    for g in range(ngram, 0, -1):
        pattern = _take(hist, jnp.maximum(end[:, None] - g + jnp.arange(g), 0))
        j = jnp.arange(length - g + 1)
        same = jnp.ones((b, length - g + 1), bool)
        for o in range(g):
            same &= hist[:, o:length - g + 1 + o] == pattern[:, o:o + 1]
        ok = same & (j >= start[:, None]) & (j + g < end[:, None]) & (end - start >= g)[:, None]
        last = jnp.max(jnp.where(ok, j, -1), axis=1)
        cont = jnp.where((cont < 0) & (last >= 0), last + g, cont)
    period = jnp.maximum(end - cont, 1)
    idx = jnp.where(cont[:, None] >= 0, cont[:, None] + jnp.arange(k) % period[:, None], end[:, None] - 1)
    return _take(hist, idx)


def _speculate(t_graph, t_params, d_graph, d_params, prompt, prompt_mask, row_keys, active, rows, *, max_new: int,
               k: int, greedy: bool, eos_id, pad_id: int, stream: bool):
    """prompt, prompt_mask: [B, P] (left padded); row_keys: [B]; active: [B] (False: bucket filler);
    rows: ``sampling_rows`` (traced, as in plain generation).
    ``d_graph`` None: prompt lookup. Returns (new tokens [B, N], pad after EOS; stats [4] int32)."""
    target = nnx.merge(t_graph, t_params)
    draft = None if d_graph is None else nnx.merge(d_graph, d_params)
    b, p = prompt.shape
    width = max_new + k + 1
    arange = jnp.arange(k + 1)

    # History: prompt then committed tokens, and each slot's position (before any soft prompt).
    positions = positions_from_mask(prompt_mask)
    hist = jnp.concatenate([prompt, jnp.full((b, width), pad_id, jnp.int32)], axis=1)
    pos_hist = jnp.concatenate([positions, positions[:, -1:] + 1 + jnp.arange(width)], axis=1)
    start = p - jnp.sum(prompt_mask, axis=1).astype(jnp.int32)  # first real prompt slot

    def model_inputs(model, hist, idx):
        """(ids, positions, slot of idx[:, 0]) of history slots idx [B, T] for ``model``, whose soft
        prompt (if any) shifts its cache slots and positions; positions past the context only occur
        for overshoot tokens that are never committed, and are clamped."""
        soft = model.config.prompt_length
        pos = jnp.minimum(_take(pos_hist, idx) + soft, model.config.max_len - 1)
        return _take(hist, idx), pos, idx[:, 0] + soft

    def prefill(model):
        soft = model.config.prompt_length
        cache = init_cache(model.config, b, soft + p + width)
        valid = jnp.concatenate([jnp.ones((b, soft), bool), prompt_mask, jnp.ones((b, width), bool)], axis=1)
        h, cache = model.decode(prompt, positions + soft, cache, 0, valid, prefill=True)
        return h, cache, valid

    h, t_cache, t_valid = prefill(target)
    first = next_token(target.head(h[:, -1:])[:, 0], _fold(row_keys, 0), rows, greedy)  # as plain generation does
    if draft is not None:
        _, d_cache, d_valid = prefill(draft)
    else:
        d_cache, d_valid = None, None

    done = ~active
    first = jnp.where(done, pad_id, first)
    hist = hist.at[:, p].set(first)
    n = jnp.where(done, 0, 1).astype(jnp.int32)
    if eos_id is not None:
        done = done | (first == eos_id)
    done = done | (n >= max_new)
    if stream:
        jax.debug.callback(_stream_callback, jnp.zeros((b,), jnp.int32), first[:, None], n, done, ordered=True)

    def propose(i, hist, n, d_cache, keys):
        """(proposals [B, K], their distributions [B, K, V] or None (greedy / one-hot), d_cache)."""
        pend = p + n - 1
        if draft is None:
            return prompt_lookup(hist, start, p + n, k), None, d_cache

        def pick(logits, j):
            """The j-th proposal [B] and the draft's distribution it was drawn from [B, V] (None: greedy)."""
            if greedy:
                return jnp.argmax(logits, axis=-1).astype(jnp.int32), None
            q = _filtered_probs(logits, rows)
            return inverse_cdf(q, proposal_uniform(keys, j)), q

        def at(j):
            return model_inputs(draft, hist, (pend + 1 + j)[:, None])[1:]

        first = model_inputs(draft, hist, pend[:, None] - 1 + jnp.arange(2))
        return draft_proposals(draft, d_cache, d_valid, first, at, pick, k)

    def body(state):
        i, hist, n, done, t_cache, d_cache, stats = state
        k_draft, k_accept, k_final = round_keys(row_keys, i)
        d, q, d_cache = propose(i, hist, n, d_cache, k_draft)
        pend = p + n - 1
        ids, pos, slot = model_inputs(target, hist, pend[:, None] + arange)
        ids = jnp.concatenate([ids[:, :1], d], axis=1)
        h, t_cache = target.decode(ids, pos, t_cache, slot, t_valid)
        logits = target.head(h)  # [B, K + 1, V]

        if greedy:
            best = jnp.argmax(logits, axis=-1).astype(jnp.int32)
            ok = d == best[:, :k]
            a = jnp.sum(jnp.cumprod(ok, axis=1), axis=1)
            x = _take(best, a[:, None])[:, 0]
        else:
            a, x = accept(_filtered_probs(logits, rows), d, q, round_uniforms(k_accept, k), _uniform(k_final))

        cand = round_block(d, a, x)
        m = jnp.minimum(a + 1, max_new - n)
        if eos_id is not None:
            is_eos = (cand == eos_id) & (arange < m[:, None])
            m = jnp.where(jnp.any(is_eos, 1), jnp.argmax(is_eos, 1) + 1, m)
            hit = jnp.any(is_eos, 1)
        else:
            hit = jnp.zeros_like(done)
        m = jnp.where(done, 0, m)
        block = jnp.where(arange < m[:, None], cand, pad_id)
        hist = jax.vmap(lambda hrow, blk, at: jax.lax.dynamic_update_slice(hrow, blk, (at,)))(hist, block, p + n)
        if stream:
            jax.debug.callback(_stream_callback, n, block, m, done | hit | (n + m >= max_new), ordered=True)
        live = ~done
        stats = stats + jnp.stack([jnp.sum(jnp.where(live, k, 0)), jnp.sum(jnp.where(live, jnp.minimum(a, m), 0)),
                                   jnp.sum(live), jnp.sum(m)]).astype(jnp.int32)
        n = n + m
        done = done | hit | (n >= max_new)
        return i + 1, hist, n, done, t_cache, d_cache, stats

    state = (jnp.int32(1), hist, n, done, t_cache, d_cache, jnp.zeros((4,), jnp.int32))
    state = jax.lax.while_loop(lambda s: ~jnp.all(s[3]), body, state)
    hist, stats = state[1], state[6]
    return hist[:, p:p + max_new], stats


_speculate_jit = kernels.jit(_speculate, static_argnames=("t_graph", "d_graph", "max_new", "k", "greedy",
                                                          "eos_id", "pad_id", "stream"))
_stream_sink = []  # the callback of the streaming call in progress (one at a time)


def _stream_callback(n, block, m, done):
    if _stream_sink:
        _stream_sink[-1](np.asarray(n), np.asarray(block), np.asarray(m), np.asarray(done))


class _Steps:
    """Turns rounds (rows advancing by different counts) into ``on_token(step, tokens[B])`` calls:
    step s is emitted once every row has its s-th token or has finished (pad from then on)."""

    def __init__(self, on_token, rows: int, pad_id: int):
        self.on_token, self.rows, self.pad = on_token, rows, pad_id
        self.tokens = [[] for _ in range(rows)]
        self.finished = np.zeros(rows, bool)
        self.sent = 0

    def __call__(self, n, block, m, done):
        for r in range(self.rows):
            self.tokens[r].extend(int(t) for t in block[r, :m[r]])
        self.finished |= done[:self.rows]
        while True:
            s = self.sent
            if not all(len(t) > s or f for t, f in zip(self.tokens, self.finished)):
                return
            if all(len(t) <= s for t in self.tokens):
                return
            self.on_token(s, np.array([t[s] if len(t) > s else self.pad for t in self.tokens], np.int32))
            self.sent += 1


def speculate_ids(t_graph, t_params, t_config, rows, *, draft, k: int, max_new_tokens: int, sampling: Sampling,
                  seed: int, num_return_sequences: int = 1, eos_id=None, pad_id: int = 0, on_token=None):
    """New tokens [len(rows) * n, max_new_tokens] and ``SpeculationStats``, like
    ``generate.generate_ids``; ``draft``: (graphdef, params) of the draft model, or None for
    prompt lookup."""
    batch, n_rows = prompt_batch(t_config, rows, num_return_sequences, max_new_tokens, pad_id, seed)
    d_graph, d_params = draft if draft is not None else (None, None)
    if on_token is not None:
        _stream_sink.append(_Steps(on_token, n_rows, pad_id))
    try:
        out, stats = _speculate_jit(t_graph, t_params, d_graph, d_params, *batch,
                                    sampling_rows(sampling, len(batch[0])), max_new=max_new_tokens, k=k,
                                    greedy=sampling.greedy, eos_id=eos_id, pad_id=pad_id, stream=on_token is not None,
                                    use_kernels=kernels.on_one_cpu((t_params, d_params)))
        out, stats = np.asarray(out), [int(s) for s in np.asarray(stats)]
    finally:
        if on_token is not None:
            _stream_sink.pop()
    return out[:n_rows], SpeculationStats(*stats)


def compiled_programs() -> int:
    """How many speculative programs have been compiled in this process."""
    return _speculate_jit._cache_size()
