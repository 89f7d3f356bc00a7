"""Continuous batching: a fixed set of slots, each a row of one preallocated KV cache, advanced
together by one jitted decode step; requests join and leave between steps.

A request is prefilled alone (its prompt right-padded to a power-of-two bucket, so each bucket
compiles once), its cache rows are copied into free slots (one per choice, ``n``) and its first
tokens sampled; from then on every step feeds each active slot its last token at that slot's own
cache index. Sampling settings (temperature, top-k, top-p, PRNG key) are per-row arrays of the
decode state, never static arguments: any mix of requests runs the same compiled program. A slot
is freed the moment its row ends (EOS, a stop string, ``max_tokens``) or its request is cancelled.

Choice j of a request with seed s samples token i with ``fold_in(fold_in(key(s), j), i)``, the key
``LM.generate`` gives row j of one prompt, so a request's tokens do not depend on what else runs
beside it and equal ``lm.generate([prompt], ..., seed=s, num_return_sequences=n)``.

The engine's state is the generation core's ``Rows`` (one row per slot, the pending token at
slot ``slot``, the soft prompt in the first slots): prefill is ``generate.prefill``, a step is
``generate.decode_step``. With ``draft`` (a draft model or ``"prompt_lookup"``) and
``speculate_k`` K, each step is ``speculative.speculative_round`` instead: a slot advances by 1 to
K + 1 tokens, its tokens follow the model's own distribution exactly and equal
``lm.generate(..., draft=draft, speculate_k=K)``'s; the caches and the token history hold K + 2
slots past ``max_len`` for a round's overshoot, whose tokens are never committed.

Use it without HTTP::

    engine = Engine(lm, max_batch=8).start()
    request = engine.submit(lm.tokenizer.encode("def f("), max_tokens=32, temperature=0.7, seed=1)
    for event in request.events():      # or request.result()
        print(event.text, end="")
    engine.stop()
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import queue
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlm import kernels
from jaxlm.generate import Rows, bucket, decode_step, init_cache, prefill
from jaxlm.sampling import Sampling, SamplingError, sample, token_logprobs
from jaxlm.speculative import speculative_round


class QueueFull(RuntimeError):
    """More requests are waiting than ``max_queue`` allows: try again later."""


@dataclasses.dataclass(frozen=True)
class Event:
    """One step of one choice: a new token (``token``, its ``logprob`` and ``top_logprobs`` when
    asked for) and the text it adds, or the end (``finish_reason``: "stop", "length",
    "cancelled"; ``text`` then holds whatever was still held back)."""

    choice: int
    token: int | None = None
    text: str = ""
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] | None = None
    finish_reason: str | None = None


class Choice:
    """One sequence of a request: its token ids, text, log-probabilities and how it ended."""

    def __init__(self, request: Request, index: int):
        self.request, self.index = request, index
        self.slot: int | None = None
        self.token_ids: list[int] = []
        self.logprobs: list[float] = []
        self.top_logprobs: list[tuple[tuple[int, float], ...]] = []
        self.text = ""
        self.sent = 0  # characters of text already handed out in events
        self.finish_reason: str | None = None
        self.last_time: float | None = None


class Request:
    """A submitted request. Consume it with ``events()`` (a blocking iterator) or ``result()``,
    unless it was submitted with ``on_event`` (called from the engine's thread for each event)."""

    def __init__(self, ids, sampling: Sampling, *, on_event=None):
        self.ids, self.sampling = list(ids), sampling
        self.max_tokens, self.seed, self.n = sampling.max_tokens, sampling.seed, sampling.n
        self.stop, self.logprobs = sampling.stop, sampling.logprobs
        self.choices = [Choice(self, j) for j in range(self.n)]
        self.submitted = time.perf_counter()
        self.first_token_time: float | None = None
        self.cancelled = False
        self._queue = queue.SimpleQueue() if on_event is None else None
        self._on_event = on_event or self._queue.put
        self._done = threading.Event()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def deliver(self, event: Event) -> None:
        """Hand an event to the consumer (the engine's thread calls it)."""
        self._on_event(event)

    def finish(self) -> None:
        """Mark the request done (once every choice has finished)."""
        self._done.set()

    def cancel(self) -> None:
        """Stop generating (e.g. the client went away): its slots are freed before the next step."""
        self.cancelled = True

    def events(self):
        """Every event until each choice has finished (needs a request submitted without on_event)."""
        left = self.n
        while left:
            event = self._queue.get()
            yield event
            left -= event.finish_reason is not None

    def result(self, timeout: float | None = None) -> list[Choice]:
        """The finished choices (blocks until the request is done)."""
        if self._queue is not None:
            for _ in self.events():
                pass
        elif not self._done.wait(timeout):
            raise TimeoutError("the request did not finish in time")
        return self.choices


@functools.partial(kernels.jit, static_argnames=("graphdef",))
def _prefill(graphdef, params, ids, mask):
    """ids [1, P] right-padded (``mask`` its real tokens) -> ``generate.prefill`` into P (+ soft
    prompt) slots: the prompt's cache rows and the next-token logits."""
    model = nnx.merge(graphdef, params)
    return prefill(model, ids, mask, model.config.prompt_length + ids.shape[1])


def _put_rows(full, rows, slot):
    """Copy one request's cache rows into slot ``slot`` of the decode cache (either layout)."""
    def put(f, r):
        start = (0, slot, 0, 0, 0) if f.ndim == 5 else (slot, 0, 0, 0)
        return jax.lax.dynamic_update_slice(f, r.astype(f.dtype), start)
    return jax.tree.map(put, full, rows)


@functools.partial(jax.jit, donate_argnums=(0,))
def _insert(state: Rows, pre, slot, temperature, top_k, top_p, key, want, hist=None, d_rows=None):
    """Start a choice in ``slot``: copy the prompt's cache rows (``pre``, a ``Prefilled`` of one
    row), draw its first token (index 0). Speculative engines also pass the slot's token history
    (the prompt at its slots) and the draft model's cache rows."""
    t, k, p = temperature[None], top_k[None], top_p[None]
    tok = sample(pre.logits, jax.random.fold_in(key, 0)[None], t, k, p)
    lp = token_logprobs(pre.logits, tok, want[None])
    at = lambda a, v: a.at[slot].set(v)  # noqa: E731
    state = state.replace(cache=_put_rows(state.cache, pre.cache, slot), slot=at(state.slot, pre.slot[0]),
                          first=at(state.first, pre.first[0]), token=at(state.token, tok[0]), step=at(state.step, 1),
                          temperature=at(state.temperature, temperature), top_k=at(state.top_k, top_k),
                          top_p=at(state.top_p, top_p), key=at(state.key, key), want=at(state.want, want))
    if hist is not None:
        state = state.replace(hist=at(state.hist, hist.at[pre.slot[0]].set(tok[0])))
    if d_rows is not None:
        state = state.replace(d_cache=_put_rows(state.d_cache, d_rows, slot))
    return state, (tok, *lp)


@functools.partial(kernels.jit, static_argnames=("graphdef",), donate_argnums=(2,))
def _step(graphdef, params, state: Rows, active):
    """``generate.decode_step`` for every slot (inactive rows run too, on whatever their slot
    holds, and are ignored)."""
    return decode_step(nnx.merge(graphdef, params), state, active, greedy=False)


@functools.partial(kernels.jit, static_argnames=("t_graph", "d_graph", "k"), donate_argnums=(4,))
def _speculative_step(t_graph, t_params, d_graph, d_params, state: Rows, active, *, k: int):
    """``speculative.speculative_round`` for every slot (``d_graph`` None: prompt lookup); greedy
    and sampled slots mix in one program."""
    target = nnx.merge(t_graph, t_params)
    draft = None if d_graph is None else nnx.merge(d_graph, d_params)
    return speculative_round(target, draft, state, active, k=k, greedy=False)


class Engine:
    """Continuous-batching generation over ``lm`` (a decoder ``jaxlm.LM``).

    ``max_batch`` slots of ``max_len`` cache positions each (default: the model's context, at
    most 2048); ``max_queue`` requests may wait for a slot (more: ``QueueFull``);
    ``prefill_tokens`` bounds the prompt tokens prefilled between two decode steps (at least one
    request), trading time-to-first-token against the other rows' inter-token latency.
    ``metrics``: an object with ``first_token(seconds)`` and ``token_gap(seconds)`` methods (each
    called once per generated token) and ``speculated(proposed, accepted)`` (once per speculative
    step), or None. ``draft``: speculative decoding with a draft model (an ``LM`` or a model path
    with the same tokenizer) or ``"prompt_lookup"``, proposing ``speculate_k`` tokens per step
    (default 4).
    """

    def __init__(self, lm, *, max_batch: int = 8, max_len: int | None = None, max_queue: int = 256,
                 prefill_tokens: int = 2048, metrics=None, draft=None, speculate_k: int | None = None):
        cfg = lm.config
        if not cfg.causal or cfg.head != "lm":
            raise ValueError(f"serving needs a decoder with a language-model head; {cfg.name!r} is an "
                             f"{cfg.arch} with head {cfg.head!r}")
        if max_batch < 1:
            raise ValueError(f"max_batch={max_batch} must be >= 1")
        if max_queue < 0:
            raise ValueError(f"max_queue={max_queue} must be >= 0")
        self.lm, self.max_batch, self.max_queue, self.prefill_tokens = lm, max_batch, max_queue, prefill_tokens
        self.max_len = min(cfg.context, max_len or min(cfg.context, 2048))
        if self.max_len <= cfg.prompt_length + 1:
            raise ValueError(f"max_len={max_len} leaves no room for a prompt (the soft prompt takes "
                             f"{cfg.prompt_length} positions)")
        self.eos_id, self.pad_id = lm.eos_id, lm.pad_id
        self.metrics = metrics
        # ((graphdef, params) of the draft model, or None), K
        self._draft, self.speculate_k = lm.proposer(draft, speculate_k, self.max_len, length_name="max_len")
        self.proposed = self.accepted = 0  # draft tokens, over all speculative steps
        self._use_kernels = kernels.on_one_cpu((lm.params, self._draft and self._draft[1]))
        self._pending: collections.deque[Request] = collections.deque()
        self._slots: list[Choice | None] = [None] * max_batch
        self._cv = threading.Condition()
        self._closing = False
        self._admitting: Request | None = None  # the request being prefilled into its slots
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None
        with lm.on_mesh():
            self._state = self._init_state()

    # -- public surface -------------------------------------------------------------------------

    @property
    def max_prompt(self) -> int:
        """The longest prompt (tokens) a request may have, leaving room for one new token."""
        return self.max_len - self.lm.config.prompt_length - 1

    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    @property
    def slots_in_use(self) -> int:
        return sum(c is not None for c in self._slots)

    @property
    def started(self) -> bool:
        """Whether ``start`` has been called."""
        return self._thread is not None

    @property
    def alive(self) -> bool:
        """Whether the scheduling loop is running (started, not stopped, no error)."""
        return self.error is None and self._thread is not None and self._thread.is_alive()

    @property
    def closing(self) -> bool:
        """Whether ``stop`` was called: no new requests are taken."""
        return self._closing

    def check(self, n_prompt: int, sampling: Sampling, names=None) -> Sampling:
        """``sampling`` checked for a prompt of ``n_prompt`` tokens (``Sampling.check``, with n up
        to max_batch and the room the cache leaves): a ValueError naming the bad setting (as
        ``names`` spells it) before anything is queued."""
        if n_prompt < 1:
            raise ValueError("the prompt is empty: give at least one token")
        if n_prompt > self.max_prompt:
            raise ValueError(f"the prompt has {n_prompt} tokens; this server takes at most {self.max_prompt} "
                             f"(--max-len {self.max_len})")
        sampling = sampling.check(self.lm.config.vocab_size, max_n=self.max_batch, names=names,
                                  max_n_hint=" (the server's --max-batch)")
        room = self.max_len - self.lm.config.prompt_length - n_prompt
        if sampling.max_tokens > room:
            name = (names or {}).get("max_tokens", "max_tokens")
            raise SamplingError(name, f"{name}={sampling.max_tokens} does not fit: the prompt's {n_prompt} tokens "
                                      f"leave room for {room} new ones (--max-len {self.max_len})")
        if sampling.stop and self.lm.tokenizer is None:
            raise SamplingError("stop", "stop strings need a model with a tokenizer")
        return sampling

    def submit(self, ids, sampling: Sampling | None = None, *, on_event=None, **settings) -> Request:
        """Queue a prompt (token ids) with ``sampling``, or with ``Sampling``'s fields as keywords
        (max_tokens=16, temperature=0.0, top_k=0, top_p=1.0, seed=None, n=1, stop=(),
        logprobs=None). ``seed`` None draws one; ``stop``: strings that end a choice (needs a
        tokenizer); ``logprobs``: None, or how many top alternatives to report per token (0 ..
        20). Raises ValueError for bad settings, QueueFull when the queue is full."""
        if sampling is None:
            sampling = Sampling(**{"seed": None, **settings})
        elif settings:
            raise TypeError("give sampling or its fields as keywords, not both")
        ids = [int(i) for i in ids]
        sampling = self.check(len(ids), sampling)
        v = self.lm.config.vocab_size
        if any(not 0 <= i < v for i in ids):
            raise ValueError(f"prompt token ids must be in [0, {v})")
        if sampling.seed is None:
            sampling = dataclasses.replace(sampling, seed=int.from_bytes(np.random.default_rng().bytes(4), "little"))
        request = Request(ids, sampling, on_event=on_event)
        with self._cv:
            if self.error is not None:
                raise RuntimeError(f"the engine stopped after an error: {self.error!r}")
            if self._closing:
                raise QueueFull("the server is shutting down")
            if len(self._pending) >= self.max_queue:
                raise QueueFull(f"{len(self._pending)} requests are already waiting (--max-queue {self.max_queue})")
            self._pending.append(request)
            self._cv.notify()
        return request

    def start(self) -> Engine:
        """Run the scheduling loop in a background thread."""
        self._thread = threading.Thread(target=self._run, name="jaxlm-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float | None = None) -> None:
        """Take no new requests, finish the queued and running ones (up to ``timeout`` seconds,
        then cancel what is left) and stop the loop."""
        with self._cv:
            self._closing = True
            self._cv.notify()
        if self._thread is None:
            return
        self._thread.join(timeout)
        if self._thread.is_alive():
            with self._cv:
                for r in list(self._pending) + [c.request for c in self._slots if c is not None]:
                    r.cancel()
                self._cv.notify()
            self._thread.join()

    @property
    def acceptance(self) -> float | None:
        """The share of draft tokens accepted so far (None: not speculative, or nothing proposed)."""
        return self.accepted / self.proposed if self.proposed else None

    def warmup(self) -> None:
        """Compile every program requests will need (each prompt bucket's prefill and insert, the
        decode step) so the first requests do not wait for the compiler."""
        with self.lm.on_mesh():
            for p in self._buckets():
                self._start_rows(np.zeros(p, np.int32), 0, 0, Sampling(), jax.random.key(0), False)
            self._advance(np.zeros(self.max_batch, bool))

    def compiled_programs(self) -> int:
        """Programs compiled so far by the engine's jitted functions (prefill, insert, step)."""
        return sum(kernels.compiled_programs(f) for f in (_prefill, _insert, _step, _speculative_step))

    # -- the loop -------------------------------------------------------------------------------

    def _init_state(self) -> Rows:
        b, cfg = self.max_batch, self.lm.config
        # Speculative rounds write up to K + 1 slots past the pending token: room for the overshoot.
        s = self.max_len + (self.speculate_k + 2 if self.speculate_k else 0)
        # Every leaf its own buffer: the step donates the state, and a buffer cannot be donated twice.
        state = Rows(cache=init_cache(cfg, b, s), slot=jnp.zeros(b, jnp.int32),
                     first=jnp.full(b, cfg.prompt_length, jnp.int32), token=jnp.full(b, self.pad_id, jnp.int32),
                     step=jnp.zeros(b, jnp.int32), key=jax.random.split(jax.random.key(0), b),
                     temperature=jnp.zeros(b, jnp.float32), top_k=jnp.zeros(b, jnp.int32),
                     top_p=jnp.ones(b, jnp.float32), want=jnp.zeros(b, bool))
        if self.speculate_k:  # each slot's tokens, at their cache slots
            state = state.replace(hist=jnp.full((b, s), self.pad_id, jnp.int32))
        if self._draft is not None:
            d_cfg = nnx.merge(*self._draft).config
            state = state.replace(d_cache=init_cache(d_cfg, b, s - cfg.prompt_length + d_cfg.prompt_length))
        return state

    def _bucket(self, n: int) -> int:
        """The padded prefill length of an n-token prompt (a power of two, within the cache)."""
        return min(bucket(n, minimum=16), self.max_len - self.lm.config.prompt_length)

    def _buckets(self) -> list[int]:
        return sorted({self._bucket(1 << k) for k in range(self.max_prompt.bit_length() + 1)})

    def _run(self) -> None:
        try:
            with self.lm.on_mesh():
                while True:
                    with self._cv:
                        while not self._pending and not self.slots_in_use and not self._closing:
                            self._cv.wait()
                        if self._closing and not self._pending and not self.slots_in_use:
                            return
                    self._drop_cancelled()
                    self._admit()
                    if self.slots_in_use:
                        self._decode()
        except BaseException as e:  # a failed step must not leave clients waiting forever
            self.error = e
            with self._cv:
                requests = list(self._pending) + [c.request for c in self._slots if c is not None]
                if self._admitting is not None:  # taken from the queue, not yet in its slots
                    requests.append(self._admitting)
                self._pending.clear()
            for r in {id(r): r for r in requests}.values():
                for c in r.choices:
                    if c.finish_reason is None:
                        self._finish(c, "error")
            raise

    def _drop_cancelled(self) -> None:
        with self._cv:
            gone = [r for r in self._pending if r.cancelled]
            for r in gone:
                self._pending.remove(r)
        for r in gone:
            for c in r.choices:
                self._finish(c, "cancelled")
        for c in self._slots:
            if c is not None and c.request.cancelled:
                self._finish(c, "cancelled")

    def _admit(self) -> None:
        budget = self.prefill_tokens
        while True:
            free = [i for i, c in enumerate(self._slots) if c is None]
            with self._cv:
                if not self._pending or len(free) < self._pending[0].n or budget <= 0:
                    return
                request = self._admitting = self._pending.popleft()
            budget -= len(request.ids)
            self._start(request, free)
            self._admitting = None

    def _start(self, request: Request, free: list[int]) -> None:
        """Prefill ``request`` once and start each of its choices in a free slot."""
        p = self._bucket(len(request.ids))
        ids = np.full(p, self.pad_id, np.int32)
        ids[:len(request.ids)] = request.ids
        root = jax.random.key(request.seed)
        prefilled = None
        for choice, slot in zip(request.choices, free):
            key = jax.random.fold_in(root, choice.index)
            prefilled, out = self._start_rows(ids, len(request.ids), slot, request.sampling, key,
                                              request.logprobs is not None, prefilled)
            choice.slot = slot
            self._slots[slot] = choice
            self._emit(choice, *out)

    def _start_rows(self, ids, n_prompt, slot, sampling, key, want, prefilled=None):
        """Prefill ids (right-padded, n_prompt real tokens; unless ``prefilled`` holds this prompt's
        ``Prefilled`` rows already, and the draft's cache rows) into ``slot`` and draw its first
        token: (prefilled, (token, logprob, top ids, top logprobs))."""
        cfg, n = self.lm.config, max(n_prompt, 1)
        if prefilled is None:
            prompt, mask = jnp.asarray(ids)[None], jnp.asarray(np.arange(len(ids)) < n)[None]
            prefilled = (_prefill(self.lm.graphdef, self.lm.params, prompt, mask, use_kernels=self._use_kernels),)
            if self._draft is not None:
                prefilled += (_prefill(*self._draft, prompt, mask, use_kernels=self._use_kernels).cache,)
        hist = None
        if self.speculate_k:
            hist = np.full(self._state.hist.shape[1], self.pad_id, np.int32)
            hist[cfg.prompt_length:cfg.prompt_length + n_prompt] = ids[:n_prompt]
            hist = jnp.asarray(hist)
        self._state, out = _insert(self._state, prefilled[0], jnp.int32(slot), jnp.float32(sampling.temperature),
                                   jnp.int32(sampling.top_k), jnp.float32(sampling.top_p), key, jnp.asarray(want),
                                   hist, prefilled[1] if len(prefilled) > 1 else None)
        tok, lp, top_ids, top_lp = (np.asarray(x) for x in out)
        return prefilled, (int(tok[0]), float(lp[0]), top_ids[0], top_lp[0])

    def _advance(self, active):
        """One decode step for every slot: (tokens [B, T], counts [B], accepted draft tokens [B],
        logprobs [B, T], top ids, top logprobs [B, T, MAX_TOP_LOGPROBS]); slot b's new tokens are
        tokens[b, :counts[b]], the first accepted[b] of them the draft's."""
        if not self.speculate_k:
            self._state, out = _step(self.lm.graphdef, self.lm.params, self._state, jnp.asarray(active),
                                     use_kernels=self._use_kernels)
            tok, lp, top_ids, top_lp = (np.asarray(x) for x in out)
            count = active.astype(np.int32)
            return tok[:, None], count, 0 * count, lp[:, None], top_ids[:, None], top_lp[:, None]
        d_graph, d_params = self._draft if self._draft is not None else (None, None)
        self._state, out = _speculative_step(self.lm.graphdef, self.lm.params, d_graph, d_params, self._state,
                                             jnp.asarray(active), k=self.speculate_k, use_kernels=self._use_kernels)
        return tuple(np.asarray(x) for x in out)

    def _decode(self) -> None:
        active = np.array([c is not None for c in self._slots])
        tok, count, accepted, lp, top_ids, top_lp = self._advance(active)
        used = 0  # accepted draft tokens a choice kept (not cut by EOS, a stop string or max_tokens)
        for slot, choice in enumerate(self._slots):
            for j in range(count[slot] if choice is not None else 0):
                self._emit(choice, int(tok[slot, j]), float(lp[slot, j]), top_ids[slot, j], top_lp[slot, j])
                used += j < accepted[slot]
                if choice.finish_reason is not None:  # EOS, a stop string or max_tokens: drop the rest
                    break
        if self.speculate_k:
            proposed = int(active.sum()) * self.speculate_k
            self.proposed, self.accepted = self.proposed + proposed, self.accepted + used
            if getattr(self.metrics, "speculated", None) is not None:  # older metrics objects lack it
                self.metrics.speculated(proposed, used)

    # -- per-token bookkeeping --------------------------------------------------------------------

    def _emit(self, choice: Choice, tok: int, lp: float, top_ids, top_lp) -> None:
        """Record one new token of ``choice``; end it at EOS, a stop string or max_tokens."""
        request, now = choice.request, time.perf_counter()
        if self.metrics is not None:
            if choice.last_time is None:
                self.metrics.first_token(now - request.submitted)
            else:
                self.metrics.token_gap(now - choice.last_time)
        if request.first_token_time is None:
            request.first_token_time = now
        choice.last_time = now
        if tok == self.eos_id:
            return self._finish(choice, "stop")
        choice.token_ids.append(tok)
        top = None
        if request.logprobs is not None:
            choice.logprobs.append(lp)
            top = tuple((int(i), float(x)) for i, x in zip(top_ids[:request.logprobs], top_lp[:request.logprobs]))
            choice.top_logprobs.append(top)
        text, stopped = self._text(choice)
        held = text if stopped else _hold_back(text, request.stop)
        delta = held[choice.sent:] if held.startswith(choice.text[:choice.sent]) else ""
        choice.text = text
        choice.sent += len(delta)
        request.deliver(Event(choice.index, tok, delta, lp if top is not None else None, top))
        if stopped:
            self._finish(choice, "stop")
        elif len(choice.token_ids) >= request.max_tokens:
            self._finish(choice, "length")

    def _text(self, choice: Choice) -> tuple[str, bool]:
        """(text so far, cut before the first stop string; whether a stop string was found)."""
        tok = self.lm.tokenizer
        if tok is None:
            return "", False
        text = tok.decode(choice.token_ids)
        cuts = [text.index(s) for s in choice.request.stop if s in text]
        return (text[:min(cuts)], True) if cuts else (text, False)

    def _finish(self, choice: Choice, reason: str) -> None:
        if choice.finish_reason is not None:
            return
        choice.finish_reason = reason
        if choice.slot is not None and self._slots[choice.slot] is choice:
            self._slots[choice.slot] = None
        request = choice.request
        rest = choice.text[choice.sent:] if reason in ("stop", "length") else ""
        choice.sent += len(rest)
        request.deliver(Event(choice.index, text=rest, finish_reason=reason))
        if all(c.finish_reason is not None for c in request.choices):
            request.finish()


def _hold_back(text: str, stops: tuple[str, ...]) -> str:
    """``text`` without what may still change: a trailing incomplete character (decoded as
    U+FFFD) and a suffix that could be the start of a stop string."""
    text = text.rstrip("\ufffd")
    cut = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), cut, -1):
            if text.endswith(s[:k]):
                cut = k
                break
    return text[:len(text) - cut]
