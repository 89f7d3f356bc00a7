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
from jaxlm.generate import STREAMS, Rows, cache_slots, key_valid, positions_at, prefill, prompt_batch
from jaxlm.sampling import Sampling, filter_logits, inverse_cdf, next_token, sampling_rows, token_logprobs

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


def _clamp(pos, model):
    """Positions past the model's context occur only for overshoot tokens (never committed)."""
    return jnp.minimum(pos, model.config.max_len - 1)


def draft_proposals(draft, d_cache, hist, slot, first, shift, rows, keys, k: int, greedy: bool):
    """A draft model's K proposals after each row's pending token: (proposals [B, K], the
    distributions they were drawn from [B, K, V] (one-hot for greedy rows; None in a ``greedy``
    program), the draft's cache). hist, slot, first: the target's (``Rows``); ``shift``: the
    draft's slot minus the target's (their soft prompts differ).

    The token before the pending one is fed again (a fully accepted round left it unwritten), then
    K - 1 proposals; the K-th comes from the last logits (its keys are written next round)."""
    d_soft = draft.config.prompt_length
    d_first = first + shift
    valid = key_valid(d_first, d_soft, cache_slots(d_cache))

    def feed(ids, t_slots, d_cache):  # ids at the target's slots t_slots [B, T]
        pos = _clamp(positions_at(t_slots + shift, d_first, d_soft), draft)
        h, d_cache = draft.decode(ids, pos, d_cache, t_slots[:, 0] + shift, valid)
        return draft.head(h[:, -1:])[:, 0], d_cache

    def pick(logits, j):
        best = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        if greedy:
            return best, None
        q = row_probs(logits, *rows)
        return jnp.where(rows[0] > 0, inverse_cdf(q, proposal_uniform(keys, j)), best), q

    def step(carry, j):
        logits, d_cache = carry
        tok, q = pick(logits, j)
        logits, d_cache = feed(tok[:, None], (slot + 1 + j)[:, None], d_cache)
        return (logits, d_cache), (tok, q)

    idx = slot[:, None] - 1 + jnp.arange(2)
    logits, d_cache = feed(_take(hist, idx), idx, d_cache)
    (logits, d_cache), (toks, qs) = jax.lax.scan(step, (logits, d_cache), jnp.arange(k - 1))
    last, q = pick(logits, k - 1)
    toks = jnp.concatenate([jnp.moveaxis(toks, 0, 1), last[:, None]], 1)
    return toks, None if q is None else jnp.concatenate([jnp.moveaxis(qs, 0, 1), q[:, None]], 1), d_cache


def speculative_round(target, draft, state: Rows, active, *, k: int, greedy: bool):
    """One round for every row of ``state`` (``Rows`` with ``hist``, per-row ``slot``; ``d_cache``
    with a ``draft`` model, None: prompt lookup): (state, (tokens [B, K + 1], counts [B],
    accepted proposals [B], log-probs [B, K + 1], top ids, top log-probs [B, K + 1, ...])). A row
    commits tokens[b, :counts[b]] (0 where not ``active``), the first accepted[b] of them the
    draft's; its slot and step advance by that much. Inactive rows run too and are ignored.
    ``greedy`` (static): argmax verification, no sampling code; otherwise greedy and sampled rows
    mix (a greedy row's distributions are one-hot, which makes the rule greedy verification)."""
    slot, hist, step, first = state.slot, state.hist, state.step, state.first
    b, soft = hist.shape[0], target.config.prompt_length
    # Idle rows count as greedy: a finished sampled request must not keep the sampling path on.
    rows = (jnp.where(active, state.temperature, 0.0), state.top_k, state.top_p)
    k_draft, k_accept, k_final = round_keys(state.key, step)
    d_cache = state.d_cache
    if draft is None:
        d, q = prompt_lookup(hist, first, slot + 1, k), None
    else:
        shift = draft.config.prompt_length - soft
        d, q, d_cache = draft_proposals(draft, d_cache, hist, slot, first, shift, rows, k_draft, k, greedy)
    idx = slot[:, None] + jnp.arange(k + 1)
    ids = jnp.concatenate([_take(hist, slot[:, None]), d], axis=1)
    h, cache = target.decode(ids, _clamp(positions_at(idx, first, soft), target), state.cache, slot,
                             key_valid(first, soft, cache_slots(state.cache)))
    logits = target.head(h)  # [B, K + 1, V]
    if greedy:
        best = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        a = jnp.sum(jnp.cumprod(d == best[:, :k], axis=1), axis=1)
        x = _take(best, a[:, None])[:, 0]
    else:
        a, x = accept(row_probs(logits, *rows), d, q, round_uniforms(k_accept, k), _uniform(k_final))
    block = round_block(d, a, x)
    hist = jax.vmap(lambda row, blk, at: jax.lax.dynamic_update_slice(row, blk, (at,)))(hist, block, slot + 1)
    m = jnp.where(active, a + 1, 0)
    want = jnp.repeat(state.want & active, k + 1)
    lp, top_ids, top_lp = token_logprobs(logits.reshape(b * (k + 1), -1), block.reshape(-1), want)
    state = state.replace(cache=cache, hist=hist, slot=slot + m, step=step + active, d_cache=d_cache,
                          token=_take(block, a[:, None])[:, 0])
    return state, (block, m, a, lp.reshape(b, k + 1), top_ids.reshape(b, k + 1, -1), top_lp.reshape(b, k + 1, -1))


def _speculate(t_graph, t_params, d_graph, d_params, prompt, prompt_mask, row_keys, active, rows, stream_id, *,
               max_new: int, k: int, greedy: bool, eos_id, pad_id: int, stream: bool):
    """prompt, prompt_mask: [B, P] (left padded); row_keys: [B]; active: [B] (False: bucket filler);
    rows: ``sampling_rows`` (traced, as in plain generation); stream_id: ``STREAMS``'s.
    ``d_graph`` None: prompt lookup. Returns (new tokens [B, N], pad after EOS; stats [4] int32)."""
    target = nnx.merge(t_graph, t_params)
    draft = None if d_graph is None else nnx.merge(d_graph, d_params)
    b, p = prompt.shape
    width = max_new + k + 1  # committed tokens and a round's overshoot
    arange = jnp.arange(k + 1)
    soft = target.config.prompt_length
    pre = prefill(target, prompt, prompt_mask, soft + p + width)
    first = next_token(pre.logits, _fold(row_keys, 0), rows, greedy)  # as plain generation does
    d_cache = None
    if draft is not None:
        d_cache = prefill(draft, prompt, prompt_mask, draft.config.prompt_length + p + width).cache

    done = ~active
    first = jnp.where(done, pad_id, first)
    hist = jnp.full((b, soft + p + width), pad_id, jnp.int32).at[:, soft:soft + p].set(prompt).at[:, soft + p].set(first)
    out = jnp.full((b, width), pad_id, jnp.int32).at[:, 0].set(first)
    n = jnp.where(done, 0, 1).astype(jnp.int32)
    if eos_id is not None:
        done = done | (first == eos_id)
    done = done | (n >= max_new)
    if stream:
        STREAMS.emit(stream_id, jnp.zeros((b,), jnp.int32), first[:, None], n, done)
    state = Rows(cache=pre.cache, slot=pre.slot, first=pre.first, token=first, step=jnp.ones((b,), jnp.int32),
                 key=row_keys, temperature=rows[0], top_k=rows[1], top_p=rows[2], want=jnp.zeros((b,), bool),
                 hist=hist, d_cache=d_cache)

    def body(carry):
        state, n, done, out, stats = carry
        state, (cand, _, a, *_) = speculative_round(target, draft, state, ~done, k=k, greedy=greedy)
        m = jnp.minimum(a + 1, max_new - n)
        hit = jnp.zeros_like(done)
        if eos_id is not None:
            is_eos = (cand == eos_id) & (arange < m[:, None])
            hit = jnp.any(is_eos, 1)
            m = jnp.where(hit, jnp.argmax(is_eos, 1) + 1, m)
        m = jnp.where(done, 0, m)
        block = jnp.where(arange < m[:, None], cand, pad_id)
        out = jax.vmap(lambda row, blk, at: jax.lax.dynamic_update_slice(row, blk, (at,)))(out, block, n)
        ended = done | hit | (n + m >= max_new)
        if stream:
            STREAMS.emit(stream_id, n, block, m, ended)
        live = ~done
        stats = stats + jnp.stack([jnp.sum(jnp.where(live, k, 0)), jnp.sum(jnp.where(live, jnp.minimum(a, m), 0)),
                                   jnp.sum(live), jnp.sum(m)]).astype(jnp.int32)
        return state, n + m, ended, out, stats

    carry = (state, n, done, out, jnp.zeros((4,), jnp.int32))
    _, _, _, out, stats = jax.lax.while_loop(lambda c: ~jnp.all(c[2]), body, carry)
    return out[:, :max_new], stats


_speculate_jit = kernels.jit(_speculate, static_argnames=("t_graph", "d_graph", "max_new", "k", "greedy",
                                                          "eos_id", "pad_id", "stream"))


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


def speculate_ids(t_graph, t_params, t_config, rows, *, draft, k: int, sampling: Sampling, eos_id=None,
                  pad_id: int = 0, on_token=None):
    """New tokens [len(rows) * n, sampling.max_tokens] and ``SpeculationStats``, like
    ``generate.generate_ids``; ``draft``: (graphdef, params) of the draft model, or None for
    prompt lookup."""
    batch, n_rows = prompt_batch(t_config, rows, sampling, pad_id)
    d_graph, d_params = draft if draft is not None else (None, None)
    with STREAMS.open(on_token and _Steps(on_token, n_rows, pad_id)) as stream_id:
        out, stats = _speculate_jit(t_graph, t_params, d_graph, d_params, *batch,
                                    sampling_rows(sampling, len(batch[0])), jnp.int32(stream_id or 0),
                                    max_new=sampling.max_tokens, k=k, greedy=sampling.greedy, eos_id=eos_id,
                                    pad_id=pad_id, stream=stream_id is not None,
                                    use_kernels=kernels.on_one_cpu((t_params, d_params)))
        out, stats = np.asarray(out), [int(s) for s in np.asarray(stats)]
    return out[:n_rows], SpeculationStats(*stats)


def compiled_programs() -> int:
    """How many speculative programs have been compiled in this process."""
    return kernels.compiled_programs(_speculate_jit)
