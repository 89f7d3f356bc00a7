"""The generation core: one ``prefill`` and one ``decode_step`` over per-row state (``Rows``),
shared by ``LM.generate`` (a ``lax.while_loop`` of decode steps inside one jitted program), the
server engine (one jitted step per scheduler turn) and speculative decoding (whose round,
``speculative.speculative_round``, advances the same state).

Dimension legend: B rows, P prompt length (bucketed), N new tokens, S cache slots, V vocab,
W bitmask words (ceil(V / 32)).

Slots and positions: a model with a soft prompt of P_s vectors keeps them in cache slots
0..P_s-1; a row's text starts at slot ``first``; slots between the two are left padding (as
``LM.generate`` batches prompts), never attended to; the token at slot s has position
s - (first - P_s), so padding shifts no position. The KV cache is preallocated and updated in
place; the prompt is never recomputed. Prompt lengths and batch sizes are rounded up to buckets,
so a new prompt length reuses the compiled program of its bucket. Every row has its own PRNG key
(derived from the seed and the row's index): token i of a row is drawn with
``fold_in(key, i)``, so a row's samples do not depend on the batch it runs in.
"""

from __future__ import annotations

import contextlib
import itertools
import threading

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from jaxlm import kernels
from jaxlm.config import ModelConfig
from jaxlm.sampling import Sampling, next_token, sampling_rows, token_logprobs  # noqa: F401 (Sampling: re-exported)
from jaxlm.sharding import constrain


def init_cache(cfg: ModelConfig, batch: int, length: int):
    """Zeroed KV cache in the compute dtype, in the layout the layer loop wants:
    {"k", "v": [L, B, K, S, Dh]} with scan_layers, else {"k", "v": L-tuples of [B, K, S, Dh]}
    (heads before slots: ``attention.write_cache`` says why)."""
    shape = (batch, cfg.kv_heads, length, cfg.dim_per_head)
    axes = ("batch", "kv_heads", "length", "head_dim")  # on a mesh: rows over data, heads over tensor
    if cfg.scan_layers:
        return {n: constrain(jnp.zeros((cfg.n_layers, *shape), cfg.dtype), ("layers", *axes)) for n in ("k", "v")}
    return {n: tuple(constrain(jnp.zeros(shape, cfg.dtype), axes) for _ in range(cfg.n_layers)) for n in ("k", "v")}


def cache_slots(cache) -> int:
    """S: the slots of a cache in ``init_cache``'s layout."""
    return jax.tree.leaves(cache)[0].shape[-2]


@struct.dataclass
class Rows:
    """Per-row decode state, a pytree; every field is [B] unless said otherwise.

    cache: ``init_cache``'s layout; slot: where the pending token is written (one int for all
    rows, as ``LM.generate``'s rows advance together, or [B]); first: each row's first text slot;
    token: the pending token (sampled, its keys and values not yet in the cache); step: tokens
    sampled so far (the next one draws with ``fold_in(key, step)``); key: PRNG keys;
    temperature, top_k, top_p: sampling settings; want: log-probabilities asked for;
    bitmask: [B, W] the tokens each row may draw next (``sampling.mask_tokens``; None:
    unconstrained); hist: [B, S] the token at each slot and d_cache: the draft model's cache
    (speculative decoding only; None otherwise).
    """

    cache: dict
    slot: jax.Array
    first: jax.Array
    token: jax.Array
    step: jax.Array
    key: jax.Array
    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    want: jax.Array
    bitmask: jax.Array | None = None
    hist: jax.Array | None = None
    d_cache: dict | None = None

    @property
    def sampling(self):
        """(temperature, top_k, top_p): ``sampling.sample``'s per-row settings."""
        return self.temperature, self.top_k, self.top_p


def key_valid(first, soft: int, s: int):
    """[B, S]: the slots a row's queries may attend to (the soft prompt, then from ``first`` on;
    causality by slot hides the rest)."""
    slots = jnp.arange(s)[None]
    return (slots < soft) | (slots >= first[:, None])


def positions_at(slots, first, soft: int):
    """The positions of tokens at ``slots`` ([B] or [B, T]) of rows whose text starts at ``first``."""
    pad = first - soft
    return slots - (pad if jnp.ndim(slots) <= 1 else pad[:, None])


@struct.dataclass
class Prefilled:
    """A prefill's result: cache [B] rows of S slots; first: [B] each row's first text slot;
    slot: [B] where the token after the prompt goes; logits: [B, V] after each row's last prompt
    token; prompt_logprobs: [B, P] log p(token t | tokens before it) at each prompt position after
    a row's first (0 elsewhere), or None."""

    cache: dict
    first: jax.Array
    slot: jax.Array
    logits: jax.Array
    prompt_logprobs: jax.Array | None = None


def prefill(model, ids, mask, cache_len: int, *, prompt_logprobs: bool = False) -> Prefilled:
    """Run prompts ids [B, P] into a fresh cache of ``cache_len`` slots. mask [B, P]: each row's
    real tokens, one contiguous run (left padded, as ``LM.generate`` batches prompts, or right
    padded, as the engine buckets one prompt). A soft prompt takes the first slots. With
    ``prompt_logprobs`` (static) the head runs over every position (for scoring a prompt)."""
    cfg = model.config
    soft = cfg.prompt_length
    b, p = ids.shape
    n = jnp.sum(mask, axis=1).astype(jnp.int32)
    lead = jnp.argmax(mask, axis=1).astype(jnp.int32)  # the first real token (rows hold at least one)
    last = lead + n - 1
    cache = init_cache(cfg, b, cache_len)
    valid = jnp.concatenate([jnp.ones((b, soft), bool), mask | (jnp.arange(p)[None] > last[:, None]),
                             jnp.ones((b, cache_len - soft - p), bool)], axis=1)
    positions = jnp.maximum(jnp.arange(p)[None] - lead[:, None], 0) + soft
    h, cache = model.decode(ids, positions, cache, 0, valid, prefill=True)
    logits = model.head(jnp.take_along_axis(h, last[:, None, None], axis=1))[:, 0]
    lps = None
    if prompt_logprobs:
        lp = jax.nn.log_softmax(model.head(h[:, :-1]), axis=-1)
        lp = jnp.take_along_axis(lp, ids[:, 1:, None], axis=-1)[..., 0]
        real = mask[:, 1:] & mask[:, :-1]
        lps = jnp.concatenate([jnp.zeros((b, 1), jnp.float32), jnp.where(real, lp, 0.0)], axis=1)
    return Prefilled(cache, soft + lead, soft + last + 1, logits, lps)


def decode_step(model, rows: Rows, active=None, *, greedy: bool):
    """Feed every row its pending token and draw the next: (rows, (tokens [B], their log-probs
    [B], top ids, top log-probs [B, MAX_TOP_LOGPROBS])). ``active`` [B] (None: all rows, with a
    shared ``slot``): rows that advance; the others run too and keep their slot and step.
    ``greedy`` (static): argmax only, no sampling code."""
    soft = model.config.prompt_length
    h, cache = model.decode(rows.token[:, None], positions_at(rows.slot, rows.first, soft)[:, None], rows.cache,
                            rows.slot, key_valid(rows.first, soft, cache_slots(rows.cache)))
    logits = model.head(h)[:, 0]
    keys = jax.vmap(jax.random.fold_in)(rows.key, rows.step)
    tok = next_token(logits, keys, rows.sampling, greedy, rows.bitmask)
    advance = jnp.ones_like(rows.step) if active is None else active.astype(jnp.int32)
    lp = token_logprobs(logits, tok, rows.want if active is None else rows.want & active)
    rows = rows.replace(cache=cache, token=tok, slot=rows.slot + (1 if active is None else advance),
                        step=rows.step + advance)
    return rows, (tok, *lp)


class Streams:
    """Host callbacks of the streaming calls in flight, each under an id: a jitted program streams
    to the id it is given (a traced argument), so one compiled program serves every call and
    calls may run at the same time (in threads)."""

    def __init__(self):
        self._fns, self._ids, self._lock = {}, itertools.count(), threading.Lock()

    @contextlib.contextmanager
    def open(self, fn):
        """``fn``'s id for as long as the block runs (None when ``fn`` is None: no stream)."""
        if fn is None:
            yield None
            return
        with self._lock:
            i = next(self._ids) % (1 << 31)
            self._fns[i] = fn
        try:
            yield i
        finally:
            with self._lock:
                del self._fns[i]

    def send(self, i, *args) -> None:
        """Call stream ``i``'s callback with ``args`` (numpy arrays), from inside a program
        (``jax.debug.callback``)."""
        fn = self._fns.get(int(i))
        if fn is not None:
            fn(*args)

    def emit(self, stream_id, *args) -> None:
        """Inside a jitted program: hand ``args`` to stream ``stream_id``'s callback, in order."""
        jax.debug.callback(lambda i, *a: self.send(i, *(np.asarray(x) for x in a)), stream_id, *args, ordered=True)


STREAMS = Streams()


def _generate(graphdef, params, prompt, prompt_mask, row_keys, active, rows, stream_id, *, max_new: int,
              greedy: bool, eos_id, pad_id: int, stream: bool):
    """prompt, prompt_mask: [B, P] (left padded); row_keys: [B]; active: [B] (False: bucket filler);
    rows: ``sampling_rows`` (traced: one program serves every temperature / top-k / top-p; ``greedy``
    programs have no sampling code); stream_id: ``STREAMS``'s id when ``stream``.

    Returns the new tokens [B, N]; after a row's EOS (and for inactive rows) they are ``pad_id``.
    """
    model = nnx.merge(graphdef, params)
    b, p = prompt.shape
    soft = model.config.prompt_length
    pre = prefill(model, prompt, prompt_mask, soft + p + max_new)
    first = next_token(pre.logits, jax.vmap(jax.random.fold_in, (0, None))(row_keys, 0), rows, greedy)
    state = Rows(cache=pre.cache, slot=jnp.int32(soft + p), first=pre.first, token=first,
                 step=jnp.ones((b,), jnp.int32), key=row_keys, temperature=rows[0], top_k=rows[1], top_p=rows[2],
                 want=jnp.zeros((b,), bool))

    def emit(i, tok, done, out):
        tok = jnp.where(done, pad_id, tok)
        if stream:
            STREAMS.emit(stream_id, i, tok)
        out = jax.lax.dynamic_update_slice(out, tok[:, None], (0, i))
        if eos_id is not None:
            done = done | (tok == eos_id)
        return done, out

    done, out = emit(0, first, ~active, jnp.full((b, max_new), pad_id, jnp.int32))

    def cond(carry):
        i, _, done, _ = carry
        return (i < max_new) & ~jnp.all(done)

    def body(carry):
        i, state, done, out = carry
        state, (tok, *_) = decode_step(model, state, greedy=greedy)
        done, out = emit(i, tok, done, out)
        return i + 1, state, done, out

    return jax.lax.while_loop(cond, body, (jnp.int32(1), state, done, out))[3]


# use_kernels=on_one_cpu(params): jaxlm.kernels' CPU decode kernels (weights read once per step).
_generate_jit = kernels.jit(_generate, static_argnames=("graphdef", "max_new", "greedy", "eos_id",
                                                        "pad_id", "stream"))


def bucket(n: int, minimum: int = 8) -> int:
    """The next power of two >= n (at least ``minimum``)."""
    return max(minimum, 1 << (int(n) - 1).bit_length())


def compiled_programs() -> int:
    """How many generation programs have been compiled in this process (for tests and tuning)."""
    return kernels.compiled_programs(_generate_jit)


def generate_ids(graphdef, params, config: ModelConfig, rows, *, sampling: Sampling, eos_id=None,
                 pad_id: int = 0, on_token=None) -> np.ndarray:
    """New tokens [len(rows) * n, sampling.max_tokens] for prompts given as lists of ids (any
    lengths), ``sampling`` checked. Row r of the output is prompt r // n's sample r % n.
    ``on_token(step, tokens[B])`` streams."""
    batch, n_rows = prompt_batch(config, rows, sampling, pad_id)
    with STREAMS.open(on_token and (lambda i, tok: on_token(int(i), tok))) as stream_id:
        out = _generate_jit(graphdef, params, *batch, sampling_rows(sampling, len(batch[0])),
                            jnp.int32(stream_id or 0), max_new=sampling.max_tokens, greedy=sampling.greedy,
                            eos_id=eos_id, pad_id=pad_id, stream=stream_id is not None,
                            use_kernels=kernels.on_one_cpu(params))
        out = np.asarray(out)
    return out[:n_rows]


def prompt_batch(config: ModelConfig, rows, sampling: Sampling, pad_id: int):
    """((prompt [B, P], mask [B, P], row keys [B], active [B]), real rows): prompts as id lists,
    each repeated ``sampling.n`` times, left padded into buckets (B and P powers of two); row j's
    key is ``fold_in(key(seed), j)``."""
    rows = [list(r) for r in rows for _ in range(sampling.n)]
    longest = max(len(r) for r in rows)
    p = min(bucket(longest), config.context - sampling.max_tokens)
    b = bucket(len(rows), minimum=1)
    # Padding slots are masked, but their ids are still embedded: keep them inside the vocabulary.
    prompt = np.full((b, p), pad_id if 0 <= pad_id < config.vocab_size else 0, np.int32)
    mask = np.zeros((b, p), bool)
    for i, r in enumerate(rows):
        prompt[i, p - len(r):], mask[i, p - len(r):] = r, True
    keys = jax.vmap(jax.random.fold_in, (None, 0))(jax.random.key(sampling.seed), jnp.arange(b))
    return (jnp.asarray(prompt), jnp.asarray(mask), keys, jnp.asarray(np.arange(b) < len(rows))), len(rows)
