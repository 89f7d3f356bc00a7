"""CPU kernels for decode steps: a few rows times each weight matrix, and one query over the cache.

A decode step reads every weight once and every cached key and value once, and computes little.
XLA:CPU's GEMM repacks the weight matrix on every call: at 4-32 rows (a batched decode step) that
halves the rate at which weights are read (GPT-2 small MLP shapes, 2 cores: 8-10 GB/s at 8 rows
against 25 GB/s at one), and its batched attention dots of one query per head read the cache at
about half the machine's rate too. The kernels in ``cpu_kernels.cc`` (AVX-512, run on XLA's
intra-op thread pool, registered through ``jax.ffi``) read each weight element and each valid cache
slot exactly once per step, whatever the batch.

They are used only where a program is traced inside :func:`use` (generation, speculative decoding
and the server turn it on, through :func:`jit`, for a model held on one CPU device), and only for
float32 operands: ``matmul`` of at most ``MAX_ROWS`` rows, ``decode_attention`` of one query
position. Everything else, every other backend, and every differentiated use takes XLA's own
ops. ``pip install`` builds the library (setup.py) where a C++ compiler is found; without one, or
on a CPU without AVX-512, :func:`available` is False and nothing changes.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import inspect
import pathlib
import threading

import jax
import jax.numpy as jnp
import numpy as np

# Rows up to which the matmul kernels beat XLA's dot (measured on GPT-2 small shapes): weights
# [K, N] (Dense kernels, fan-in first) and [N, K] (the tied embedding as the output projection).
MAX_ROWS, MAX_ROWS_TRANSPOSED = 32, 16
# Queries per row up to which the attention kernel runs (a speculative round's K + 1, K <= 32); a
# longer block (a prefill) is a batched matmul, XLA's.
MAX_QUERIES = 33
_HERE = pathlib.Path(__file__).parent
_state = threading.local()


@functools.cache
def _library():
    for path in sorted(_HERE.glob("_cpu_kernels*.so")):
        try:
            lib = ctypes.CDLL(str(path))
        except OSError:
            continue
        if lib.JaxlmKernelsUsable():
            return lib
    return None


@functools.cache
def available() -> bool:
    """True when the kernels are built, this CPU runs them, and they are registered with XLA."""
    lib = _library()
    if lib is None:
        return False
    for target, symbol in (("jaxlm_matmul_kn", "JaxlmMatmulKN"), ("jaxlm_matmul_nk", "JaxlmMatmulNK"),
                           ("jaxlm_decode_attention", "JaxlmDecodeAttention")):
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
    return True


def enabled() -> bool:
    """Whether the program being traced uses the kernels (inside ``use(True)``, and they exist)."""
    return getattr(_state, "enabled", False)


@contextlib.contextmanager
def use(on: bool = True):
    """Within this block, at trace time, :func:`matmul` and :func:`decode_attention` use the CPU
    kernels where they apply. Turn it on only for programs whose operands live on one CPU device
    (a custom call knows nothing of sharding). jax.jit caches a trace per function and arguments,
    not per this flag: jitted programs take it as a static argument (:func:`jit`)."""
    before = enabled()
    _state.enabled = bool(on) and available()
    try:
        yield
    finally:
        _state.enabled = before


def jit(fn, *, static_argnames=(), **jit_kwargs):
    """``jax.jit(fn)`` with one more static keyword argument, ``use_kernels`` (default False):
    True traces ``fn`` inside :func:`use` (pass ``on_one_cpu(params)``)."""
    def traced(*args, use_kernels: bool = False, **kwargs):
        with use(use_kernels):
            return fn(*args, **kwargs)

    functools.update_wrapper(traced, fn)
    del traced.__wrapped__
    sig = inspect.signature(fn)
    extra = inspect.Parameter("use_kernels", inspect.Parameter.KEYWORD_ONLY, default=False)
    traced.__signature__ = sig.replace(parameters=[*sig.parameters.values(), extra])
    return jax.jit(traced, static_argnames=(*static_argnames, "use_kernels"), **jit_kwargs)


def compiled_programs(jitted) -> int:
    """How many programs a jitted function (``jit``'s, or ``jax.jit``'s) has compiled in this
    process. jax has no public count: its private ``_cache_size()`` is read here and nowhere else
    (the tests prove that new prompt lengths, sampling settings and runs compile nothing)."""
    return jitted._cache_size()


def on_one_cpu(tree) -> bool:
    """Whether every array in ``tree`` sits on one and the same CPU device."""
    devices = set()
    for leaf in jax.tree_util.tree_leaves(tree):
        sharding = getattr(leaf, "sharding", None)
        if sharding is not None:
            devices |= set(sharding.device_set)
    return len(devices) == 1 and next(iter(devices)).platform == "cpu"


def matmul(x, w, transpose: bool = False):
    """x [M, K] @ w [K, N], or x @ w.T for ``transpose`` (w [N, K])."""
    if (enabled() and x.ndim == 2 and w.ndim == 2 and x.shape[0] <= (MAX_ROWS_TRANSPOSED if transpose else MAX_ROWS)
            and x.dtype == jnp.float32 and w.dtype == jnp.float32):
        return _matmul(x, w, transpose)
    return _xla_matmul(x, w, transpose)


def _xla_matmul(x, w, transpose):
    return x @ (w.T if transpose else w)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def _matmul(x, w, transpose):
    n = w.shape[0] if transpose else w.shape[1]
    call = jax.ffi.ffi_call("jaxlm_matmul_nk" if transpose else "jaxlm_matmul_kn",
                            jax.ShapeDtypeStruct((x.shape[0], n), jnp.float32))
    return jax.lax.platform_dependent(x, w, cpu=call, default=lambda x, w: _xla_matmul(x, w, transpose))


@_matmul.defjvp
def _matmul_jvp(transpose, primals, tangents):  # differentiated uses: XLA's dot for the tangent
    (x, w), (dx, dw) = primals, tangents
    return _matmul(x, w, transpose), _xla_matmul(dx, w, transpose) + _xla_matmul(x, dw, transpose)


def decode_attention(q, k, v, valid, scale: float):
    """Attention of a few queries per row (a decode step's one, a speculative round's K + 1),
    q [B, T, H, Dh], over a cache k, v [B, K, S, Dh] (H = K x G), query t of row b seeing the slots
    where ``valid`` [B, T, S] holds: [B, T, H, Dh], or None where the kernel does not apply
    (outside :func:`use`, not float32, more than MAX_QUERIES queries or 64 heads per cache head, or
    Dh > 256). A query with no valid slot gives zeros."""
    b, t, h, dh = q.shape
    if not (enabled() and q.dtype == k.dtype == v.dtype == jnp.float32 and t <= MAX_QUERIES
            and h % k.shape[1] == 0 and h // k.shape[1] <= 64 and dh <= 256):
        return None
    call = jax.ffi.ffi_call("jaxlm_decode_attention", jax.ShapeDtypeStruct(q.shape, jnp.float32))
    return call(q, k, v, valid.astype(bool), scale=np.float32(scale))
