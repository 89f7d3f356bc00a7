"""Jitted generation: one prefill over the prompt, then a lax.while_loop of single-token decode steps.

Dimension legend: B rows, P prompt length (bucketed), N new tokens, S = P + N cache slots, V vocab.

The KV cache is preallocated to S slots and updated in place; the prompt is never recomputed.
Prompt lengths and batch sizes are rounded up to buckets, so a new prompt length reuses the
compiled program of its bucket. Every row has its own PRNG key (derived from the seed and the
row's index), so a row's samples do not depend on the batch it runs in.
"""

from __future__ import annotations

import dataclasses
import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlm import kernels
from jaxlm.config import ModelConfig
from jaxlm.sharding import constrain
from jaxlm.transformer import positions_from_mask


@dataclasses.dataclass(frozen=True)
class Sampling:
    """temperature 0 is greedy; otherwise HF's order: temperature, then top-k, then top-p."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def check(self, vocab_size: int | None = None) -> None:
        """One clear error per bad setting; top_k's upper bound only once the vocabulary is known."""
        real("temperature", self.temperature)
        integer("top_k", self.top_k)
        real("top_p", self.top_p)
        if not 0 <= self.temperature < math.inf:
            raise ValueError(f"temperature={self.temperature} must be >= 0 and finite (0 is greedy)")
        if not 0 <= self.top_k <= (vocab_size if vocab_size is not None else self.top_k):
            raise ValueError(f"top_k={self.top_k} must be in [0, {vocab_size or 'vocab_size'}] (0 disables it)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def integer(name: str, value) -> int:
    """``value`` if it is an integer (Python or numpy), else a one-line ValueError naming ``name``."""
    if not isinstance(value, numbers.Integral):
        raise ValueError(f"{name}={value!r} must be an integer")
    return int(value)


def real(name: str, value) -> float:
    """``value`` as a float if it is a real number, else a one-line ValueError naming ``name``."""
    if not isinstance(value, numbers.Real):
        raise ValueError(f"{name}={value!r} must be a number")
    return float(value)


def check_request(max_new_tokens: int, num_return_sequences: int, sampling: Sampling,
                  vocab_size: int | None = None, seed: int = 0) -> None:
    """The settings of a generation request, checked before any work (and before a model is loaded)."""
    integer("max_new_tokens", max_new_tokens)
    integer("num_return_sequences", num_return_sequences)
    integer("seed", seed)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    if num_return_sequences < 1:
        raise ValueError(f"num_return_sequences={num_return_sequences} must be >= 1")
    sampling.check(vocab_size)


def _sortable(x):
    """float32 -> uint32 with the same order (so thresholds can be found by integer bisection)."""
    b = jax.lax.bitcast_convert_type(x, jnp.uint32)
    return jnp.where(b >> 31 == 1, ~b, b | jnp.uint32(0x80000000))


def _bisect(pred, shape):
    """Per row, the smallest uint32 t with pred(t) True, for pred monotone (False..False True..True).

    32 halvings of [0, 2^32 - 1], each one compare-and-reduce pass over [B, V]: XLA's sort on CPU
    is a comparator sort, far slower than this for a 50k vocabulary.
    """
    def step(_, bounds):
        lo, hi = bounds
        mid = lo + (hi - lo) // 2
        ok = pred(mid)
        return jnp.where(ok, lo, mid + 1), jnp.where(ok, mid, hi)

    lo = jnp.zeros(shape, jnp.uint32)
    hi = jnp.full(shape, 0xFFFFFFFF, jnp.uint32)
    return jax.lax.fori_loop(0, 32, step, (lo, hi))[0]


# A top-k of at most TOP_CANDIDATES is found with lax.top_k (a partial sort: ~1 ms for 4 rows of
# GPT-2's 50k vocabulary), and a top-p after it among those candidates; otherwise (a top-k above
# it, or a top-p alone, whose set may span the vocabulary) by bisection over the whole vocabulary
# (32 passes over [B, V] per filter: ~7 ms for both on those 4 rows at -O3, ~50 ms at -O0).
TOP_CANDIDATES = 256


def filter_logits(logits, temperature, top_k, top_p):
    """logits / T with every token outside the top-k / top-p set at -inf, per row. logits: [B, V];
    temperature (> 0), top_k (0: off), top_p (1: off): [B] arrays.

    Top-k keeps the k largest; top-p then keeps the tokens whose more likely tokens hold less than
    top_p of the (top-k renormalised) probability mass. Ties at a threshold are all kept. The
    filters run only when some row uses one (``lax.cond``), so filter-free batches pay nothing.
    """
    logits = logits.astype(jnp.float32) / temperature[:, None]
    k, p = top_k[:, None], top_p[:, None]
    n = min(TOP_CANDIDATES, logits.shape[-1])

    def among_candidates(x):
        vals, idx = jax.lax.top_k(x, n)  # [B, n], descending
        kth = jnp.take_along_axis(vals, jnp.clip(k - 1, 0, n - 1), -1)
        x = jnp.where((k > 0) & (x < kth), -jnp.inf, x)
        cand = jnp.take_along_axis(jax.nn.softmax(x, axis=-1), idx, -1)  # 0 where top-k dropped it
        return _top_p_among(x, vals, cand, p)

    # Every row's set lies among the candidates when each row has a top-k <= n, or no filter.
    few = jnp.all((top_k <= n) & ((top_k > 0) | (top_p >= 1)))
    branch = jnp.where(jnp.any((top_k > 0) | (top_p < 1)), jnp.where(few, 1, 2), 0)
    return jax.lax.switch(branch, [lambda x: x, among_candidates, lambda x: _bisection_filter(x, k, p)], logits)


def _top_p_among(x, vals, cand, p):
    """x with top-p applied, its set found among the sorted candidates: a candidate stays when the
    candidates before it hold less than p (a tie group is decided by its first member, as the
    strict "more likely tokens" rule says; ties past the last candidate stay with it)."""
    before = jnp.cumsum(cand, axis=-1) - cand
    cut = jnp.min(jnp.where(before < p, vals, jnp.inf), -1, keepdims=True)
    return jnp.where((p < 1) & (x < cut), -jnp.inf, x)


def _bisection_filter(logits, k, p):
    """filter_logits for any settings: each threshold by bisection over the sortable keys."""
    neg = jnp.float32(-jnp.inf)
    keys = _sortable(logits)
    rows = (logits.shape[0], 1)

    def by_top_k(x):
        # The k-th largest value: the smallest t with fewer than k values above it.
        kth = _bisect(lambda t: jnp.sum(keys > t, -1, keepdims=True) < k, rows)
        return jnp.where((k > 0) & (keys < kth), neg, x)

    def by_top_p(x):
        probs = jax.nn.softmax(x, axis=-1)
        cut = _bisect(lambda t: jnp.sum(jnp.where(keys > t, probs, 0.0), -1, keepdims=True) < p, rows)
        return jnp.where((p < 1) & (keys < cut), neg, x)

    logits = jax.lax.cond(jnp.any(k > 0), by_top_k, lambda x: x, logits)
    return jax.lax.cond(jnp.any(p < 1), by_top_p, lambda x: x, logits)


def sample(logits, keys, temperature, top_k, top_p):
    """One token per row. logits: [B, V]; keys: [B] PRNG keys; temperature (0: greedy), top_k,
    top_p: [B] arrays, so one compiled program serves any mix of settings.

    Inverse-CDF sampling (one uniform per row against the cumulative probabilities): on CPU it
    is ~4x cheaper than Gumbel-max, which draws V random numbers per row.
    """
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def sampled():
        t = jnp.where(temperature > 0, temperature, 1.0)
        probs = jax.nn.softmax(filter_logits(logits, t, top_k, top_p), axis=-1)
        return jnp.where(temperature > 0, inverse_cdf(probs, jax.vmap(jax.random.uniform)(keys)), greedy)

    return jax.lax.cond(jnp.all(temperature == 0), lambda: greedy, sampled)


def next_token(logits, keys, rows, greedy: bool):
    """``sample`` with ``rows`` (``sampling_rows``); in a ``greedy`` program (static) the argmax
    alone, so greedy decoding compiles no sampling code."""
    return jnp.argmax(logits, axis=-1).astype(jnp.int32) if greedy else sample(logits, keys, *rows)


def inverse_cdf(probs, u):
    """One token per row of probs [N, V] (need not sum to 1): the first whose cumulative
    probability exceeds u [N] (uniform in [0, 1)) times the row's total."""
    cdf = jnp.cumsum(probs, axis=-1)
    return jnp.minimum(jnp.sum(cdf <= u[:, None] * cdf[:, -1:], axis=-1), probs.shape[-1] - 1).astype(jnp.int32)


def sampling_rows(s: Sampling, b: int):
    """A ``Sampling`` as the per-row arrays ``sample`` takes."""
    return (jnp.full((b,), s.temperature, jnp.float32), jnp.full((b,), s.top_k, jnp.int32),
            jnp.full((b,), s.top_p, jnp.float32))


MAX_TOP_LOGPROBS = 20  # OpenAI's limit


def token_logprobs(logits, tokens, want):
    """(log-probability of each row's token [B], the MAX_TOP_LOGPROBS most likely tokens' ids and
    log-probabilities [B, MAX_TOP_LOGPROBS]) under the model's distribution (before temperature
    and filters, as OpenAI reports them); computed only when some row ``want``s them ([B] bool)."""
    b = logits.shape[0]

    def compute():
        lp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        top_lp, top_ids = jax.lax.top_k(lp, MAX_TOP_LOGPROBS)
        return jnp.take_along_axis(lp, tokens[:, None], axis=-1)[:, 0], top_ids.astype(jnp.int32), top_lp

    def skip():
        return (jnp.zeros((b,), jnp.float32), jnp.zeros((b, MAX_TOP_LOGPROBS), jnp.int32),
                jnp.zeros((b, MAX_TOP_LOGPROBS), jnp.float32))

    return jax.lax.cond(jnp.any(want), compute, skip)


def init_cache(cfg: ModelConfig, batch: int, length: int):
    """Zeroed KV cache in the compute dtype, in the layout the layer loop wants:
    {"k", "v": [L, B, K, S, Dh]} with scan_layers, else {"k", "v": L-tuples of [B, K, S, Dh]}
    (heads before slots: ``attention.write_cache`` says why)."""
    shape = (batch, cfg.kv_heads, length, cfg.dim_per_head)
    axes = ("batch", "kv_heads", "length", "kv")  # on a mesh: rows over data, heads over tensor
    if cfg.scan_layers:
        return {n: constrain(jnp.zeros((cfg.n_layers, *shape), cfg.dtype), ("layers", *axes)) for n in ("k", "v")}
    return {n: tuple(constrain(jnp.zeros(shape, cfg.dtype), axes) for _ in range(cfg.n_layers)) for n in ("k", "v")}


def _generate(graphdef, params, prompt, prompt_mask, row_keys, active, rows, *, max_new: int, greedy: bool,
              eos_id, pad_id: int, stream: bool):
    """prompt, prompt_mask: [B, P] (left padded); row_keys: [B]; active: [B] (False: bucket filler);
    rows: ``sampling_rows`` (traced: one program serves every temperature / top-k / top-p; ``greedy``
    programs have no sampling code).

    Returns the new tokens [B, N]; after a row's EOS (and for inactive rows) they are ``pad_id``.
    """
    model = nnx.merge(graphdef, params)
    cfg = model.config
    b, p = prompt.shape
    soft = cfg.prompt_length  # a soft prompt (prompt tuning) takes the first cache slots
    cache = init_cache(cfg, b, soft + p + max_new)
    key_valid = jnp.concatenate([jnp.ones((b, soft), bool), prompt_mask, jnp.ones((b, max_new), bool)], axis=1)
    positions = positions_from_mask(prompt_mask) + soft
    h, cache = model.decode(prompt, positions, cache, 0, key_valid, prefill=True)
    logits = model.head(h[:, -1:])[:, 0]  # only the last position's logits are needed

    def emit(i, logits, done, out):
        tok = next_token(logits, jax.vmap(jax.random.fold_in, (0, None))(row_keys, i), rows, greedy)
        tok = jnp.where(done, pad_id, tok)
        if stream:
            jax.debug.callback(_stream_callback, i, tok, ordered=True)
        out = jax.lax.dynamic_update_slice(out, tok[:, None], (0, i))
        if eos_id is not None:
            done = done | (tok == eos_id)
        return tok, done, out

    out = jnp.full((b, max_new), pad_id, jnp.int32)
    tok, done, out = emit(0, logits, ~active, out)
    pos = positions[:, -1] + 1

    def cond(state):
        i, _, _, done, _, _ = state
        return (i < max_new) & ~jnp.all(done)

    def body(state):
        i, tok, cache, done, out, pos = state
        h, cache = model.decode(tok[:, None], pos[:, None], cache, soft + p + i - 1, key_valid)
        tok, done, out = emit(i, model.head(h)[:, 0], done, out)
        return i + 1, tok, cache, done, out, pos + 1

    state = jax.lax.while_loop(cond, body, (jnp.int32(1), tok, cache, done, out, pos))
    return state[4]


# use_kernels=on_one_cpu(params): jaxlm.kernels' CPU decode kernels (weights read once per step).
_generate_jit = kernels.jit(_generate, static_argnames=("graphdef", "max_new", "greedy", "eos_id",
                                                        "pad_id", "stream"))
_stream_sink = []  # the callback of the streaming call in progress (one at a time)


def _stream_callback(i, tok):
    if _stream_sink:
        _stream_sink[-1](int(i), np.asarray(tok))


def bucket(n: int, minimum: int = 8) -> int:
    """The next power of two >= n (at least ``minimum``)."""
    return max(minimum, 1 << (int(n) - 1).bit_length())


def compiled_programs() -> int:
    """How many generation programs have been compiled in this process (for tests and tuning)."""
    return _generate_jit._cache_size()


def generate_ids(graphdef, params, config: ModelConfig, rows, *, max_new_tokens: int,
                 sampling: Sampling, seed: int, num_return_sequences: int = 1, eos_id=None,
                 pad_id: int = 0, on_token=None) -> np.ndarray:
    """New tokens [len(rows) * n, max_new_tokens] for prompts given as lists of ids (any lengths).

    Row r of the output is prompt r // n's sample r % n. ``on_token(step, tokens[B])`` streams.
    """
    batch, n_rows = prompt_batch(config, rows, num_return_sequences, max_new_tokens, pad_id, seed)
    if on_token is not None:
        _stream_sink.append(on_token)
    try:
        out = _generate_jit(graphdef, params, *batch, sampling_rows(sampling, len(batch[0])),
                            max_new=max_new_tokens, greedy=sampling.greedy, eos_id=eos_id, pad_id=pad_id,
                            stream=on_token is not None, use_kernels=kernels.on_one_cpu(params))
        out = np.asarray(out)
    finally:
        if on_token is not None:
            _stream_sink.pop()
    return out[:n_rows]


def prompt_batch(config: ModelConfig, rows, n: int, max_new_tokens: int, pad_id: int, seed: int):
    """((prompt [B, P], mask [B, P], row keys [B], active [B]), real rows): prompts as id lists,
    each repeated n times, left padded into buckets (B and P powers of two)."""
    rows = [list(r) for r in rows for _ in range(n)]
    longest = max(len(r) for r in rows)
    p = min(bucket(longest), config.context - max_new_tokens)
    b = bucket(len(rows), minimum=1)
    # Padding slots are masked, but their ids are still embedded: keep them inside the vocabulary.
    prompt = np.full((b, p), pad_id if 0 <= pad_id < config.vocab_size else 0, np.int32)
    mask = np.zeros((b, p), bool)
    for i, r in enumerate(rows):
        prompt[i, p - len(r):], mask[i, p - len(r):] = r, True
    keys = jax.vmap(jax.random.fold_in, (None, 0))(jax.random.key(seed), jnp.arange(b))
    return (jnp.asarray(prompt), jnp.asarray(mask), keys, jnp.asarray(np.arange(b) < len(rows))), len(rows)
