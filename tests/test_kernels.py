"""jaxlm.kernels: the CPU decode matmuls equal XLA's dot, and decoding with them changes no token."""

import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlm
from jaxlm import kernels

_AVX512 = "avx512f" in pathlib.Path("/proc/cpuinfo").read_text() if pathlib.Path("/proc/cpuinfo").exists() else False
needs_kernels = pytest.mark.skipif(not kernels.available(), reason="jaxlm's CPU kernels are not built here "
                                   "(no C++ compiler at install time, or a CPU without AVX-512)")


def test_kernels_are_built_where_they_can_be():
    """`pip install -e .` builds them on an AVX-512 CPU with a compiler (as in CI): a failing build
    must not pass unnoticed as slower decoding."""
    if not (_AVX512 and shutil.which("c++")):
        pytest.skip("no AVX-512 CPU or no C++ compiler here: the kernels are optional")
    assert kernels.available()


@needs_kernels
@pytest.mark.parametrize("transpose", [False, True])
def test_kernel_equals_xla_dot(transpose):
    """Every row count up to the limit, ragged K and N (tails of the 16-lane vectors, the 32-column
    and 3-row tiles, the per-thread ranges): within float32 rounding of XLA's dot."""
    rng = np.random.default_rng(0)
    limit = kernels.MAX_ROWS_TRANSPOSED if transpose else kernels.MAX_ROWS
    f = jax.jit(lambda x, w: kernels.matmul(x, w, transpose))
    for k, n in ((768, 3072), (37, 101), (16, 32), (5, 3)):
        w = rng.standard_normal((n, k) if transpose else (k, n)).astype(np.float32)
        for m in sorted({1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 32} & set(range(1, limit + 1))):
            x = rng.standard_normal((m, k)).astype(np.float32)
            with kernels.use():
                lowered = f.lower(x, w).as_text()
                got = np.asarray(jax.jit(lambda x, w: kernels.matmul(x, w, transpose))(x, w))
            assert "jaxlm_matmul" in lowered  # the kernel, not the fallback, was measured
            want = x.astype(np.float64) @ (w.T if transpose else w).astype(np.float64)
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4 * np.sqrt(k), err_msg=f"{m}x{k}x{n}")


@needs_kernels
@pytest.mark.parametrize("b, t, h, kh, s, d", [(8, 1, 12, 12, 160, 64), (3, 1, 8, 2, 37, 80), (2, 1, 6, 1, 16, 256),
                                             (3, 9, 6, 6, 201, 32), (2, 33, 8, 2, 70, 64)])
def test_decode_attention_equals_the_einsum_path(b, t, h, kh, s, d):
    """Multi-head, grouped-query and multi-query heads; head dims with a vector tail; slot counts
    off the 16-lane grid; ragged valid slots per row (as left-padded prompts and finished rows
    leave them); one query per row, or a speculative round's block of T causal queries. A row
    with no valid slot (a batch filler) gives zeros, not NaN."""
    from jaxlm.attention import cached_attention

    rng = np.random.default_rng(3)
    q = rng.standard_normal((b, t, h, d)).astype(np.float32)
    k, v = (rng.standard_normal((b, kh, s, d)).astype(np.float32) for _ in range(2))
    valid = np.zeros((b, s), bool)
    for r in range(b):
        lo, hi = sorted(rng.integers(0, s - t + 1, 2))
        valid[r, lo:max(hi, lo + 1) + t] = True
    valid[-1] = False
    # Query j of a row sits at the slot t - 1 - j before its last valid one, and sees none after it.
    last = np.where(valid.any(1), s - 1 - np.argmax(valid[:, ::-1], axis=1), 0)
    mask = valid[:, None, None, :] & (np.arange(s) <= (last[:, None] - t + 1 + np.arange(t))[:, :, None])[:, None]
    want = np.asarray(cached_attention(q, k, v, mask))
    with kernels.use():
        f = jax.jit(lambda q, k, v, mask: cached_attention(q, k, v, mask))
        assert "jaxlm_decode_attention" in f.lower(q, k, v, mask).as_text()
        got = np.asarray(f(q, k, v, mask))
    np.testing.assert_allclose(got[:-1], want[:-1], rtol=1e-5, atol=1e-5)
    assert np.all(got[-1] == 0)


def test_only_inside_the_context_and_for_small_float32():
    x, w = jnp.ones((4, 8)), jnp.ones((8, 16))
    # A fresh function each time: the flag is read at trace time, and jit caches traces per function.
    text = lambda x, w: jax.jit(lambda x, w: kernels.matmul(x, w)).lower(x, w).as_text()  # noqa: E731
    assert "jaxlm_matmul" not in text(x, w)  # off by default (training, evaluation)
    with kernels.use():
        if kernels.available():
            assert "jaxlm_matmul" in text(x, w)
        assert "jaxlm_matmul" not in text(jnp.ones((kernels.MAX_ROWS + 1, 8)), w)  # many rows: XLA
        assert "jaxlm_matmul" not in text(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16))
        # Attention: a prefill's block of queries is XLA's batched matmul.
        q, kv = jnp.ones((1, kernels.MAX_QUERIES + 1, 4, 8)), jnp.ones((1, 4, 40, 8))
        attend = jax.jit(lambda q, kv: kernels.decode_attention(q, kv, kv, jnp.ones((1, q.shape[1], 40), bool), 1.0))
        assert kernels.decode_attention(q, kv, kv, jnp.ones((1, q.shape[1], 40), bool), 1.0) is None
        if kernels.available():
            assert "jaxlm_decode_attention" in attend.lower(q[:, :kernels.MAX_QUERIES], kv).as_text()
    assert "jaxlm_matmul" not in text(x, w)  # the context is restored


@needs_kernels
def test_gradients_through_the_kernel_are_xla_s():
    rng = np.random.default_rng(1)
    x, w = rng.standard_normal((4, 24)).astype(np.float32), rng.standard_normal((24, 40)).astype(np.float32)
    loss = lambda x, w: jnp.sum(jnp.sin(kernels.matmul(x, w)))  # noqa: E731
    want = jax.grad(loss, (0, 1))(x, w)
    with kernels.use():
        got = jax.jit(jax.grad(loss, (0, 1)))(x, w)
    for g, e in zip(got, want):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5)


def test_on_one_cpu():
    assert kernels.on_one_cpu({"a": jnp.ones(3), "b": [jnp.zeros(2)]})
    two = jax.device_put(jnp.ones(8), jax.sharding.NamedSharding(
        jax.make_mesh((2,), ("x",), devices=jax.devices()[:2]), jax.sharding.PartitionSpec("x")))
    assert not kernels.on_one_cpu({"a": jnp.ones(3), "b": two})


@needs_kernels
def test_decoding_with_kernels_gives_the_same_tokens(hf_dir):
    """Batches 1 and 8 of ragged prompts, GPT-2 (tied embedding: the transposed kernel) and
    Llama (untied head): greedy tokens equal to decoding with XLA's dot."""
    from jaxlm import generate

    for arch in ("GPT2LMHeadModel", "LlamaForCausalLM"):
        lm = jaxlm.load(hf_dir(arch))
        rng = np.random.default_rng(2)
        for b in (1, 8):
            rows = [list(rng.integers(1, 200, int(rng.integers(2, 12)))) for _ in range(b)]
            ids = {}
            batch, n = generate.prompt_batch(lm.config, rows, generate.Sampling(max_tokens=24), 0)
            batch = (*batch, generate.sampling_rows(generate.Sampling(), len(batch[0])), jnp.int32(0))
            args = dict(max_new=24, greedy=True, eos_id=None, pad_id=0, stream=False)
            for small in (False, True):
                out = generate._generate_jit(lm.graphdef, lm.params, *batch, **args, use_kernels=small)
                ids[small] = np.asarray(out)[:n]
            if b == 8:
                text = generate._generate_jit.lower(lm.graphdef, lm.params, *batch, **args, use_kernels=True).as_text()
                assert text.count("jaxlm_matmul_kn") >= 4 * lm.config.n_layers  # every projection
            np.testing.assert_array_equal(ids[True], ids[False], err_msg=f"{arch} batch {b}")
        assert kernels.on_one_cpu(lm.params)  # so lm.generate takes the kernel path
