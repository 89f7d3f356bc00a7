"""Masks, dot-product attention and the multi-head / grouped-query attention layer.

Dimension legend: B batch, T query length, S key length, D model, H query heads, K kv heads,
G = H // K query heads per kv head, Dh head dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.layers import Dense, apply_rope, dense_options, dropout


def make_mask(key_valid, query_slots=None, *, causal: bool):
    """Boolean mask [B, 1, T, S] (causal) or [B, 1, 1, S]: which keys each query may attend to.

    key_valid: [B, S] bool, False for padding (or not yet written cache slots).
    query_slots: [B, T] int, the key index each query sits at (default: 0..T-1, i.e. T == S).
    """
    mask = key_valid[:, None, None, :]
    if causal:
        b, s = key_valid.shape
        if query_slots is None:
            query_slots = jnp.broadcast_to(jnp.arange(s), (b, s))
        mask = mask & (jnp.arange(s)[None, None, None, :] <= query_slots[:, None, :, None])
    return mask


def einsum_attention(q, k, v, mask, *, dropout_rate: float = 0.0, key=None):
    """Reference attention: softmax(q k^T / sqrt(Dh) + mask) v in float32. Returns (out, probs).

    q: [B, T, H, Dh]; k, v: [B, S, K, Dh]; mask: [B, 1, T, S] bool. probs: [B, H, T, S].
    """
    b, t, h, dh = q.shape
    kh = k.shape[2]
    q = q.reshape(b, t, kh, h // kh, dh)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
    scores = scores.reshape(b, h, t, -1) * (dh ** -0.5)
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    dropped = dropout(probs, dropout_rate, key).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", dropped.reshape(b, kh, h // kh, t, -1), v)
    return out.reshape(b, t, h, dh), probs


def dot_product_attention(q, k, v, mask, *, impl: str = "xla", dropout_rate: float = 0.0, key=None):
    """Attention output [B, T, H, Dh] via jax.nn.dot_product_attention (XLA or cuDNN flash).

    Attention-probability dropout is only available on the einsum path, which is used when active.
    """
    if impl == "einsum" or (dropout_rate > 0.0 and key is not None):
        return einsum_attention(q, k, v, mask, dropout_rate=dropout_rate, key=key)[0]
    return jax.nn.dot_product_attention(
        q, k, v, mask=mask, implementation="cudnn" if impl == "cudnn" else None)


class Attention(nnx.Module):
    """Multi-head attention with grouped-query heads (K <= H) and optional rotary positions."""

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        d, h, kh, dh = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.dim_per_head
        dense = dict(use_bias=cfg.use_bias, std=cfg.init_std, dtype=jnp.dtype(cfg.dtype), rngs=rngs)
        self.q = Dense("btd,dhk->bthk", (d, h, dh), ("embed", "heads", "kv"), **dense, **dense_options(cfg, "q"))
        self.k = Dense("btd,dhk->bthk", (d, kh, dh), ("embed", "kv_heads", "kv"), **dense, **dense_options(cfg, "k"))
        self.v = Dense("btd,dhk->bthk", (d, kh, dh), ("embed", "kv_heads", "kv"), **dense, **dense_options(cfg, "v"))
        self.o = Dense("bthk,hkd->btd", (h, dh, d), ("heads", "kv", "embed"), **dense, **dense_options(cfg, "o"))
        self.rope_theta = cfg.rope_theta if cfg.positions == "rope" else None
        self.impl = cfg.attention_impl
        self.attention_dropout = cfg.attention_dropout
        self.dropout = cfg.dropout

    def __call__(self, x, mask, positions, *, kv_cache=None, cache_index=None, key=None, need_probs=False):
        """x: [B, T, D]; mask: [B, 1, T, S]; positions: [B, T].

        With ``kv_cache`` (this layer's (k, v), each [B, S, K, Dh]) the new keys/values are written
        at ``cache_index`` and attention runs over the whole cache. Returns (y [B, T, D], kv_cache)
        with the updated cache (None without one). Writing before reading lets XLA update the
        buffer in place. ``need_probs``: also return the attention probabilities [B, H, T, S]
        (computed by the einsum path).
        """
        q, k, v = self.q(x), self.k(x), self.v(x)
        if self.rope_theta is not None:
            q = apply_rope(q, positions, self.rope_theta)
            k = apply_rope(k, positions, self.rope_theta)
        if kv_cache is not None:
            k_cache, v_cache = kv_cache
            k = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), (0, cache_index, 0, 0))
            v = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), (0, cache_index, 0, 0))
            kv_cache = (k, v)
        k_attn, k_drop = (None, None) if key is None else jax.random.split(key)
        if need_probs:
            out, probs = einsum_attention(q, k.astype(q.dtype), v.astype(q.dtype), mask,
                                          dropout_rate=self.attention_dropout, key=k_attn)
            return dropout(self.o(out), self.dropout, k_drop), kv_cache, probs
        out = dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype), mask, impl=self.impl,
                                    dropout_rate=self.attention_dropout, key=k_attn)
        return dropout(self.o(out), self.dropout, k_drop), kv_cache
