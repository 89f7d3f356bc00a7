"""Layers against direct formulas."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlm.layers import ACTIVATIONS, Dense, Norm, apply_rope, sinusoidal_positions


def test_sinusoidal_matches_formula():
    length, dim = 50, 16
    table = np.asarray(sinusoidal_positions(length, dim))
    for p in range(length):
        for i in range(dim // 2):
            angle = p / 10000 ** (2 * i / dim)
            assert table[p, 2 * i] == pytest.approx(math.sin(angle), abs=1e-5)
            assert table[p, 2 * i + 1] == pytest.approx(math.cos(angle), abs=1e-5)


def test_rope_matches_rotation_formula():
    rng = np.random.RandomState(0)
    b, t, h, dh = 2, 5, 3, 8
    x = rng.randn(b, t, h, dh).astype(np.float32)
    pos = rng.randint(0, 100, (b, t))
    got = np.asarray(apply_rope(jnp.asarray(x), jnp.asarray(pos), theta=10000.0))
    want = np.empty_like(x)
    half = dh // 2
    for bi in range(b):
        for ti in range(t):
            for i in range(half):
                a = pos[bi, ti] * 10000.0 ** (-2 * i / dh)
                x1, x2 = x[bi, ti, :, i], x[bi, ti, :, i + half]
                want[bi, ti, :, i] = x1 * math.cos(a) - x2 * math.sin(a)
                want[bi, ti, :, i + half] = x2 * math.cos(a) + x1 * math.sin(a)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_rope_scores_depend_only_on_relative_position():
    rng = np.random.RandomState(1)
    q, k = rng.randn(1, 1, 1, 16).astype(np.float32), rng.randn(1, 1, 1, 16).astype(np.float32)

    def score(m, n):
        qm = apply_rope(jnp.asarray(q), jnp.array([[m]]))
        kn = apply_rope(jnp.asarray(k), jnp.array([[n]]))
        return float((qm * kn).sum())

    assert score(7, 3) == pytest.approx(score(104, 100), abs=1e-4)
    assert score(7, 3) != pytest.approx(score(7, 4), abs=1e-3)


@pytest.mark.parametrize("kind", ["layernorm", "rmsnorm"])
def test_norms_match_formula(kind):
    rng = np.random.RandomState(2)
    x = rng.randn(3, 4, 10).astype(np.float32) * 3 + 1
    norm = Norm(10, kind, 1e-6)
    norm.scale[...] = jnp.asarray(rng.randn(10), jnp.float32)
    if kind == "layernorm":
        norm.bias[...] = jnp.asarray(rng.randn(10), jnp.float32)
        want = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-6)
        want = want * np.asarray(norm.scale[...]) + np.asarray(norm.bias[...])
    else:
        assert norm.bias is None
        want = x / np.sqrt((x ** 2).mean(-1, keepdims=True) + 1e-6) * np.asarray(norm.scale[...])
    np.testing.assert_allclose(np.asarray(norm(jnp.asarray(x))), want, atol=1e-5)


def test_activations_match_formulas():
    x = np.linspace(-5, 5, 101).astype(np.float32)
    erf = np.vectorize(math.erf)
    np.testing.assert_allclose(ACTIVATIONS["gelu"](x), 0.5 * x * (1 + erf(x / math.sqrt(2))), atol=1e-6)
    tanh = 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
    np.testing.assert_allclose(ACTIVATIONS["gelu_tanh"](x), tanh, atol=1e-6)
    np.testing.assert_allclose(ACTIVATIONS["relu"](x), np.maximum(x, 0))
    np.testing.assert_allclose(ACTIVATIONS["silu"](x), x / (1 + np.exp(-x)), atol=1e-6)


def test_dense_multi_axis_kernel_and_bias():
    d = Dense("btd,dhe->bthe", (6, 2, 3), ("embed", "heads", "head_dim"), use_bias=True, std=1.0,
              dtype=jnp.float32, rngs=nnx.Rngs(0))
    assert d.bias[...].shape == (2, 3)
    d.bias[...] = jnp.arange(6.0).reshape(2, 3)
    x = jax.random.normal(jax.random.key(1), (2, 4, 6))
    want = np.asarray(x) @ np.asarray(d.kernel[...]).reshape(6, 6)
    np.testing.assert_allclose(np.asarray(d(x)).reshape(2, 4, 6), want + np.arange(6.0), atol=1e-5)
