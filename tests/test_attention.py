"""Attention: the fast path equals the einsum reference, GQA equals MHA with shared heads, masks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.attention import dot_product_attention, einsum_attention, make_mask


def qkv(b=2, t=6, h=4, kh=2, dh=8, seed=0):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(k1, (b, t, h, dh)), jax.random.normal(k2, (b, t, kh, dh)),
            jax.random.normal(k3, (b, t, kh, dh)))


def numpy_attention(q, k, v, mask):
    q, k, v, mask = map(np.asarray, (q, k, v, mask))
    g = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
    s = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(q.shape[-1])
    s = np.where(mask, s, -1e30)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhts,bshd->bthd", p, v)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_attention_paths_match_direct_formula(causal, kv_heads):
    q, k, v = qkv(kh=kv_heads)
    valid = jnp.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]], bool)
    mask = make_mask(valid, causal=causal)
    want = numpy_attention(q, k, v, mask)
    rows = np.asarray(valid)  # compare real query positions only
    for impl in ("xla", "einsum"):
        got = np.asarray(dot_product_attention(q, k, v, mask, impl=impl))
        np.testing.assert_allclose(got[rows], want[rows], atol=1e-5)


def test_mask_shapes_and_causality():
    valid = jnp.array([[0, 1, 1]], bool)  # left padding
    m = np.asarray(make_mask(valid, causal=True))[0, 0]
    np.testing.assert_array_equal(m, [[0, 0, 0], [0, 1, 0], [0, 1, 1]])
    m = np.broadcast_to(np.asarray(make_mask(valid, causal=False)), (1, 1, 3, 3))[0, 0]
    np.testing.assert_array_equal(m, [[0, 1, 1]] * 3)


def test_fully_masked_rows_stay_finite():
    q, k, v = qkv()
    mask = make_mask(jnp.zeros((2, 6), bool), causal=True)
    for impl in ("xla", "einsum"):
        assert np.isfinite(np.asarray(dot_product_attention(q, k, v, mask, impl=impl))).all()


def test_einsum_probs_are_normalised_and_dropout_keeps_expectation():
    q, k, v = qkv(b=1, t=4, h=2, kh=2)
    mask = make_mask(jnp.ones((1, 4), bool), causal=True)
    _, probs = einsum_attention(q, k, v, mask)
    np.testing.assert_allclose(np.asarray(probs).sum(-1), 1.0, atol=1e-6)
    assert float(probs[0, 0, 0, 1]) == 0.0  # causal
    a = einsum_attention(q, k, v, mask, dropout_rate=0.5, key=jax.random.key(0))[0]
    b = einsum_attention(q, k, v, mask, dropout_rate=0.5, key=jax.random.key(0))[0]
    c = einsum_attention(q, k, v, mask, dropout_rate=0.5, key=jax.random.key(1))[0]
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.allclose(np.asarray(a), np.asarray(c))
