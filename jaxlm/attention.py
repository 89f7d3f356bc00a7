"""Masks, dot-product attention and the multi-head / grouped-query attention layer.

Dimension legend: B batch, T query length, S key length, D model, H query heads, K kv heads,
G = H // K query heads per kv head, Dh head dim. Einsum strings use the same letters, lower case,
with e for Dh (one letter each).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlm import kernels
from jaxlm.layers import Dense, Norm, apply_rope, dense_options, dropout, rope_frequencies


def make_mask(key_valid, query_slots=None, *, causal: bool, window: int | None = None, segment_ids=None):
    """Boolean mask [B, 1, T, S] (causal, or with segments) or [B, 1, 1, S]: which keys each query
    may attend to.

    key_valid: [B, S] bool, False for padding (or not yet written cache slots).
    query_slots: [B, T] int, the key index each query sits at (default: 0..T-1, i.e. T == S).
    window: a causal query sees only the last ``window`` slots, itself included (sliding-window
    attention). Slots and positions differ only by left padding, so distances are the same.
    segment_ids: [B, S] int (T == S, no cache): several examples packed into one row; a query sees
    only keys of its own segment (0 marks padding).
    """
    mask = key_valid[:, None, None, :]
    if segment_ids is not None:
        mask = mask & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
    if causal:
        b, s = key_valid.shape
        if query_slots is None:
            query_slots = jnp.broadcast_to(jnp.arange(s), (b, s))
        keys, queries = jnp.arange(s)[None, None, None, :], query_slots[:, None, :, None]
        mask = mask & (keys <= queries)
        if window is not None:
            mask = mask & (queries - keys < window)
    return mask


def einsum_attention(q, k, v, mask, *, dropout_rate: float = 0.0, key=None, scale: float | None = None,
                     softcap: float | None = None):
    """Reference attention: softmax(q k^T * scale + mask) v in float32. Returns (out, probs).

    q: [B, T, H, Dh]; k, v: [B, S, K, Dh]; mask: [B, 1, T, S] bool. probs: [B, H, T, S].
    ``scale`` defaults to 1 / sqrt(Dh); ``softcap`` bounds the scores: cap * tanh(scores / cap).
    """
    b, t, h, dh = q.shape
    kh = k.shape[2]
    q = q.reshape(b, t, kh, h // kh, dh)
    scores = jnp.einsum("btkge,bske->bkgts", q, k, preferred_element_type=jnp.float32)
    scores = scores.reshape(b, h, t, -1) * (dh ** -0.5 if scale is None else scale)
    if softcap is not None:
        scores = softcap * jnp.tanh(scores / softcap)
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    dropped = dropout(probs, dropout_rate, key).astype(v.dtype)
    out = jnp.einsum("bkgts,bske->btkge", dropped.reshape(b, kh, h // kh, t, -1), v)
    return out.reshape(b, t, h, dh), probs


def dot_product_attention(q, k, v, mask, *, impl: str = "xla", dropout_rate: float = 0.0, key=None,
                          scale: float | None = None, softcap: float | None = None):
    """Attention output [B, T, H, Dh] via jax.nn.dot_product_attention (XLA or cuDNN flash).

    Attention-probability dropout and score soft-capping are only available on the einsum path,
    which is used when either is active.
    """
    if impl == "einsum" or softcap is not None or (dropout_rate > 0.0 and key is not None):
        return einsum_attention(q, k, v, mask, dropout_rate=dropout_rate, key=key, scale=scale, softcap=softcap)[0]
    return jax.nn.dot_product_attention(
        q, k, v, mask=mask, scale=scale, implementation="cudnn" if impl == "cudnn" else None)


def write_cache(cache, x, index):
    """``x`` [B, T, K, Dh] written into ``cache`` [B, K, S, Dh] at slot ``index``: one int for every
    row, or an int per row ([B]: rows at different lengths, as in a serving batch).

    The cache keeps heads before slots so that decode attention reads it as it lies: with [B, S, K,
    Dh], XLA transposes (copies) every layer's whole cache on every step to put the batch dims
    first, which on CPU cost more than the attention itself (batch 32, 384 slots: 3.4x the time).
    """
    x = jnp.swapaxes(x, 1, 2).astype(cache.dtype)
    if jnp.ndim(index) == 0:
        return jax.lax.dynamic_update_slice(cache, x, (0, 0, index, 0))
    return jax.vmap(lambda c, r, i: jax.lax.dynamic_update_slice(c, r, (0, i, 0)))(cache, x, index)


def cached_attention(q, k, v, mask, *, scale: float | None = None, softcap: float | None = None):
    """Attention of queries q [B, T, H, Dh] over a cache k, v [B, K, S, Dh] (``write_cache``'s
    layout, read without a transpose); mask [B, 1, T, S]. Scores and softmax in float32."""
    b, t, h, dh = q.shape
    kh = k.shape[1]
    if softcap is None:  # on one CPU device inside kernels.use(), a few queries: jaxlm's decode kernel
        out = kernels.decode_attention(q, k, v, jnp.broadcast_to(mask, (b, 1, t, mask.shape[-1])).reshape(b, t, -1),
                                       dh ** -0.5 if scale is None else scale)
        if out is not None:
            return out.astype(q.dtype)
    q = q.reshape(b, t, kh, h // kh, dh)
    scores = jnp.einsum("btkge,bkse->bkgts", q, k.astype(q.dtype), preferred_element_type=jnp.float32)
    scores = scores * (dh ** -0.5 if scale is None else scale)
    if softcap is not None:
        scores = softcap * jnp.tanh(scores / softcap)
    scores = jnp.where(mask.reshape(b, 1, 1, t, -1), scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bkgts,bkse->btkge", probs, v).astype(q.dtype).reshape(b, t, h, dh)


class Attention(nnx.Module):
    """Multi-head attention with grouped-query heads (K <= H), optional rotary positions (with
    long-context rescaling), per-head q / k norms, a custom score scale and score soft-capping."""

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        d, h, kh, dh = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.dim_per_head
        dense = dict(std=cfg.init_std, dtype=jnp.dtype(cfg.dtype), rngs=rngs)
        qkv = dict(dense, use_bias=cfg.has_qkv_bias)
        self.q = Dense("btd,dhe->bthe", (d, h, dh), ("embed", "heads", "head_dim"), **qkv, **dense_options(cfg, "q"))
        self.k = Dense("btd,dke->btke", (d, kh, dh), ("embed", "kv_heads", "head_dim"), **qkv, **dense_options(cfg, "k"))
        self.v = Dense("btd,dke->btke", (d, kh, dh), ("embed", "kv_heads", "head_dim"), **qkv, **dense_options(cfg, "v"))
        self.o = Dense("bthe,hed->btd", (h, dh, d), ("heads", "head_dim", "embed"), use_bias=cfg.use_bias, **dense,
                       **dense_options(cfg, "o"))
        norm = dict(kind="rmsnorm", eps=cfg.norm_eps, unit_offset=cfg.norm_unit_offset, axis="head_dim")
        self.q_norm = Norm(dh, **norm) if cfg.qk_norm else None
        self.k_norm = Norm(dh, **norm) if cfg.qk_norm else None
        self.rope = (tuple(float(f) for f in rope_frequencies(
            dh, cfg.rope_theta, cfg.rope_scaling, cfg.rope_factor, cfg.rope_low_freq_factor,
            cfg.rope_high_freq_factor, cfg.rope_original_max_len)) if cfg.positions == "rope" else None)
        self.scale = None if cfg.query_pre_attn_scalar is None else cfg.query_pre_attn_scalar ** -0.5
        self.softcap = cfg.attn_softcap
        self.impl = cfg.attention_impl
        self.attention_dropout = cfg.attention_dropout
        self.dropout = cfg.dropout

    def __call__(self, x, mask, positions, *, kv_cache=None, cache_index=None, key=None, need_probs=False):
        """x: [B, T, D]; mask: [B, 1, T, S]; positions: [B, T].

        With ``kv_cache`` (this layer's (k, v), each [B, K, S, Dh]) the new keys/values are written
        at ``cache_index`` (an int, or one per row) and attention runs over the whole cache. Returns (y [B, T, D], kv_cache)
        with the updated cache (None without one). Writing before reading lets XLA update the
        buffer in place. ``need_probs``: also return the attention probabilities [B, H, T, S]
        (computed by the einsum path).
        """
        q, k, v = self.q(x), self.k(x), self.v(x)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rope is not None:
            inv = np.asarray(self.rope, np.float32)
            q = apply_rope(q, positions, inv)
            k = apply_rope(k, positions, inv)
        if kv_cache is not None:
            kv_cache = (write_cache(kv_cache[0], k, cache_index), write_cache(kv_cache[1], v, cache_index))
            # A decode step (or, with jaxlm's CPU kernels, a speculative round's few queries): read
            # the cache as it lies.
            if (q.shape[1] == 1 or kernels.enabled() and q.shape[1] <= kernels.MAX_QUERIES) and not need_probs:
                out = cached_attention(q, *kv_cache, mask, scale=self.scale, softcap=self.softcap)
                return dropout(self.o(out), self.dropout, None), kv_cache
            k, v = (jnp.swapaxes(c, 1, 2) for c in kv_cache)  # prefill: [B, S, K, Dh] for flash kernels
        k_attn, k_drop = (None, None) if key is None else jax.random.split(key)
        if need_probs:
            out, probs = einsum_attention(q, k.astype(q.dtype), v.astype(q.dtype), mask,
                                          dropout_rate=self.attention_dropout, key=k_attn, scale=self.scale,
                                          softcap=self.softcap)
            return dropout(self.o(out), self.dropout, k_drop), kv_cache, probs
        out = dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype), mask, impl=self.impl,
                                    dropout_rate=self.attention_dropout, key=k_attn, scale=self.scale,
                                    softcap=self.softcap)
        return dropout(self.o(out), self.dropout, k_drop), kv_cache
