"""Shared by the benchmark scripts: machine load, median / spread, and the weight-read roofline."""

from __future__ import annotations

import os
import statistics
import time


def load_line() -> str:
    """The 1-minute load average, with a warning when the machine is busy (load > cores): a peer
    measured on a loaded machine gives ratios that do not reproduce."""
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    warn = (f"  WARNING: load {load:.2f} > {cores} cores: other work is running; these numbers will not "
            "reproduce" if load > cores else "")
    return f"machine: {cores} cores, load average {load:.2f}{warn}"


def spread(times) -> tuple[float, float, float]:
    """(median, min, max) of a list of durations."""
    return statistics.median(times), min(times), max(times)


def rate_cell(work: float, times) -> str:
    """'median (min-max)' of work / time, e.g. '32.1 (31.0-32.9)'."""
    med, lo, hi = spread(times)
    return f"{work / med:.1f} ({work / hi:.1f}-{work / lo:.1f})"


def weight_read_bandwidth(batch: int = 1, d: int = 768, f: int = 3072, n: int = 48, repeats: int = 7) -> float:
    """Bytes per second weights can be read at here: a jitted chain of n [batch, d] @ [d, f] / [f, d]
    float32 matmuls (the GPT-2 small MLP shapes, 453 MB of weights, far more than the caches),
    median of `repeats` runs; the faster of XLA's dot and jaxlm's CPU kernels (jaxlm.kernels) when
    they are built, so that the roofline is the best read rate measured, not XLA's."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxlm import kernels

    rng = np.random.RandomState(0)
    ws = [jnp.asarray(rng.standard_normal((d, f) if i % 2 == 0 else (f, d)).astype(np.float32) * 0.02)
          for i in range(n)]
    x = jnp.ones((batch, d), jnp.float32)
    best = 0.0
    for small in (False, True) if kernels.available() else (False,):
        def chain(x, ws):
            for w in ws:
                x = kernels.matmul(x, w)
            return x

        chain = kernels.jit(chain)
        chain(x, ws, use_kernels=small).block_until_ready()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            chain(x, ws, use_kernels=small).block_until_ready()
            times.append(time.perf_counter() - t0)
        best = max(best, sum(w.size * 4 for w in ws) / statistics.median(times))
    return best
