"""What a generation request asks for (``Sampling``, checked in one place) and how a token is drawn
from logits: temperature / top-k / top-p filters, inverse-CDF sampling, an optional per-row token
mask, log-probabilities.

Dimension legend: B rows, V vocab, W = ceil(V / 32) words of a token bitmask.

Every jitted function here takes its settings as per-row arrays ([B] temperature, top_k, top_p),
so one compiled program serves any mix of requests.
"""

from __future__ import annotations

import dataclasses
import math
import numbers

import jax
import jax.numpy as jnp

MAX_TOP_LOGPROBS = 20  # OpenAI's limit


class SamplingError(ValueError):
    """A bad generation setting; ``param`` names it as the caller spelled it."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


@dataclasses.dataclass(frozen=True)
class Sampling:
    """A generation request's settings: temperature 0 is greedy; otherwise HF's order:
    temperature, then top-k (0: off), then top-p (1: off). ``max_tokens`` new tokens at most;
    ``n`` sequences per prompt; ``seed`` (None: the caller draws one); ``stop`` strings end a
    sequence; ``logprobs``: None, or how many top alternatives to report per token.

    Each surface keeps its own defaults (``lm.generate``: temperature 0, the OpenAI API: 1) and
    its own names (``names`` in ``check``); every value is checked by ``check`` alone.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    max_tokens: int = 16
    n: int = 1
    seed: int | None = 0
    stop: tuple[str, ...] = ()
    logprobs: int | None = None

    def check(self, vocab_size: int | None = None, *, max_n: int | None = None, names=None,
              max_n_hint: str = "") -> "Sampling":
        """This request with its numbers as Python ints and floats, or a ``SamplingError`` naming
        the first bad setting (``names`` maps a field to the caller's name for it, e.g.
        ``{"max_tokens": "max_new_tokens"}``); top_k's upper bound only once the vocabulary is
        known, n's once the caller has one (``max_n``)."""
        names = names or {}
        values = dict(vars(self))

        def fail(field, message):
            name = names.get(field, field)
            raise SamplingError(name, f"{name}={values[field]!r} {message}")

        def number(field, kind):
            value = values[field]
            if not isinstance(value, kind) or isinstance(value, bool):
                fail(field, "must be an integer" if kind is numbers.Integral else "must be a number")
            values[field] = int(value) if kind is numbers.Integral else float(value)
            return values[field]

        temperature, top_p = number("temperature", numbers.Real), number("top_p", numbers.Real)
        top_k, max_tokens, n = (number(f, numbers.Integral) for f in ("top_k", "max_tokens", "n"))
        if not 0 <= temperature < math.inf:
            fail("temperature", "must be >= 0 and finite (0 is greedy)")
        if not 0 <= top_k <= (vocab_size if vocab_size is not None else top_k):
            fail("top_k", f"must be in [0, {vocab_size or 'vocab_size'}] (0 disables it)")
        if not 0 < top_p <= 1:
            fail("top_p", "must be in (0, 1]")
        if max_tokens < 1:
            fail("max_tokens", "must be >= 1")
        if max_n is None and n < 1:
            fail("n", "must be >= 1")
        if max_n is not None and not 1 <= n <= max_n:
            fail("n", f"must be in [1, {max_n}]{max_n_hint}")
        seed = None if self.seed is None else number("seed", numbers.Integral)
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        if not isinstance(stop, (tuple, list)) or not all(isinstance(s, str) for s in stop):
            fail("stop", "must be a string or a list of strings")
        logprobs = None if self.logprobs is None else number("logprobs", numbers.Integral)
        if logprobs is not None and not 0 <= logprobs <= MAX_TOP_LOGPROBS:
            fail("logprobs", f"must be in [0, {MAX_TOP_LOGPROBS}]")
        return Sampling(temperature, top_k, top_p, max_tokens, n, seed, tuple(s for s in stop if s), logprobs)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def end_ids(config, tokenizer) -> tuple[int | None, int]:
    """(EOS id or None, pad id) of a model: the config's EOS, else the tokenizer's; the pad id is
    the first of the config's pad, that EOS and 0 inside the vocabulary (it fills rows after their
    end and padding slots, which are embedded)."""
    eos = config.eos_token_id if config.eos_token_id is not None else (tokenizer.eos_id if tokenizer else None)
    pad = next(i for i in (config.pad_token_id, eos, 0) if i is not None and 0 <= i < config.vocab_size)
    return eos, pad


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


def inverse_cdf(probs, u):
    """One token per row of probs [N, V] (need not sum to 1): the first whose cumulative
    probability exceeds u [N] (uniform in [0, 1)) times the row's total."""
    cdf = jnp.cumsum(probs, axis=-1)
    return jnp.minimum(jnp.sum(cdf <= u[:, None] * cdf[:, -1:], axis=-1), probs.shape[-1] - 1).astype(jnp.int32)


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


def mask_tokens(logits, bitmask):
    """logits [B, V] with the tokens a row's bitmask [B, W] (uint32, bit t % 32 of word t // 32)
    does not allow at -inf; an all-ones row is unconstrained. Skipped (``lax.cond``) when no row
    is constrained, so free rows pay nothing."""
    v = logits.shape[-1]

    def apply(x):
        bits = (bitmask[:, jnp.arange(v) // 32] >> (jnp.arange(v) % 32).astype(jnp.uint32)) & 1
        return jnp.where(bits.astype(bool), x, -jnp.inf)

    return jax.lax.cond(jnp.any(bitmask != jnp.uint32(0xFFFFFFFF)), apply, lambda x: x, logits)


def allow_all(b: int, vocab_size: int):
    """An unconstrained bitmask [B, W] (every token allowed)."""
    return jnp.full((b, -(-vocab_size // 32)), 0xFFFFFFFF, jnp.uint32)


def next_token(logits, keys, rows, greedy: bool, bitmask=None):
    """``sample`` with ``rows`` (``sampling_rows``), after the per-row token ``bitmask`` (None:
    none); in a ``greedy`` program (static) the argmax alone, so greedy decoding compiles no
    sampling code."""
    if bitmask is not None:
        logits = mask_tokens(logits, bitmask)
    return jnp.argmax(logits, axis=-1).astype(jnp.int32) if greedy else sample(logits, keys, *rows)


def sampling_rows(s: Sampling, b: int):
    """A ``Sampling`` as the per-row arrays ``sample`` takes."""
    return (jnp.full((b,), s.temperature, jnp.float32), jnp.full((b,), s.top_k, jnp.int32),
            jnp.full((b,), s.top_p, jnp.float32))


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
