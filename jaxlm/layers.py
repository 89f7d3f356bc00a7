"""Building blocks shared by every model family: dense, embeddings, norms, MLP, positions.

Dimension legend: B batch, T length, D model, F mlp, V vocab, H heads, Dh head dim.
Parameters carry logical axis names (``out_sharding`` metadata); sharding.py maps them to a mesh.
Norms and softmax run in float32 whatever the compute dtype.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

Axes = tuple[str | None, ...]


def param(key, shape, axes: Axes, init: str = "normal", std: float = 0.02) -> nnx.Param:
    """A float32 parameter with logical axis names; sharding is applied later, not eagerly."""
    if init == "normal":
        value = std * jax.random.normal(key, shape, jnp.float32)
    elif init == "zeros":
        value = jnp.zeros(shape, jnp.float32)
    elif init == "ones":
        value = jnp.ones(shape, jnp.float32)
    else:
        raise ValueError(f"unknown init {init!r}")
    return nnx.Param(value, out_sharding=axes, eager_sharding=False)


def dropout(x, rate: float, key):
    """Inverted dropout; the identity when ``key`` is None (evaluation) or rate is 0."""
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


class Dense(nnx.Module):
    """y = einsum(spec, x, kernel) + bias, with a kernel of any rank (e.g. D -> H x Dh)."""

    def __init__(self, spec: str, kernel_shape, kernel_axes: Axes, *, use_bias: bool, std: float,
                 dtype, rngs: nnx.Rngs):
        self.spec = spec
        self.dtype = dtype
        self.kernel = param(rngs.params(), tuple(kernel_shape), kernel_axes, std=std)
        # The bias spans the kernel dims that survive into the output (e.g. H, Dh for D -> H x Dh).
        kernel_letters, out_letters = spec.split(",")[1].split("->")
        keep = [i for i, c in enumerate(kernel_letters) if c in out_letters]
        self.bias = (param(None, tuple(kernel_shape[i] for i in keep),
                           tuple(kernel_axes[i] for i in keep), "zeros") if use_bias else None)

    def __call__(self, x):
        x, kernel = x.astype(self.dtype), self.kernel[...].astype(self.dtype)
        x_letters, rest = self.spec.split(",")
        k_letters, out_letters = rest.split("->")
        n_in = sum(c not in out_letters for c in k_letters)  # contracted dims lead the kernel
        if x_letters[-n_in:] == k_letters[:n_in] and out_letters == x_letters[:-n_in] + k_letters[n_in:]:
            # A plain 2-D matmul over reshaped (bitcast) operands: XLA:CPU lays out multi-axis
            # einsums with extra transposes and copies, most of all in the backward pass.
            lead, k_out = x.shape[:-n_in], kernel.shape[n_in:]
            y = x.reshape(-1, math.prod(kernel.shape[:n_in])) @ kernel.reshape(-1, math.prod(k_out))
            y = y.reshape(*lead, *k_out)
        else:
            y = jnp.einsum(self.spec, x, kernel)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class Norm(nnx.Module):
    """LayerNorm (scale and bias) or RMSNorm (scale only), computed in float32."""

    def __init__(self, dim: int, kind: str, eps: float):
        self.kind = kind
        self.eps = eps
        self.scale = param(None, (dim,), ("embed",), "ones")
        self.bias = param(None, (dim,), ("embed",), "zeros") if kind == "layernorm" else None

    def __call__(self, x):
        dtype = x.dtype
        x = x.astype(jnp.float32)
        if self.kind == "layernorm":
            x = x - x.mean(-1, keepdims=True)
        x = x * jax.lax.rsqrt(jnp.square(x).mean(-1, keepdims=True) + self.eps)
        x = x * self.scale[...]
        if self.bias is not None:
            x = x + self.bias[...]
        return x.astype(dtype)


class Embed(nnx.Module):
    """Lookup table [N, D]; ``attend`` gives the tied output projection [..., D] -> [..., N]."""

    def __init__(self, num: int, dim: int, axes: Axes, *, std: float, dtype, rngs: nnx.Rngs):
        self.dtype = dtype
        self.embedding = param(rngs.params(), (num, dim), axes, std=std)

    def __call__(self, ids):
        return jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)

    def attend(self, x):
        # As a 2-D matmul: the einsum form made XLA:CPU transpose the [B*T, V] logit gradient.
        e = self.embedding[...].astype(self.dtype)
        return (x.astype(self.dtype).reshape(-1, e.shape[1]) @ e.T).reshape(*x.shape[:-1], e.shape[0])


ACTIVATIONS = {
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}


class MLP(nnx.Module):
    """Position-wise feed-forward: down(act(up(x))), D -> F -> D."""

    def __init__(self, d: int, f: int, activation: str, *, use_bias: bool, std: float, dtype,
                 rngs: nnx.Rngs):
        self.act = ACTIVATIONS[activation]
        self.up = Dense("btd,df->btf", (d, f), ("embed", "mlp"), use_bias=use_bias, std=std,
                        dtype=dtype, rngs=rngs)
        self.down = Dense("btf,fd->btd", (f, d), ("mlp", "embed"), use_bias=use_bias, std=std,
                          dtype=dtype, rngs=rngs)

    def __call__(self, x, dropout_rate: float = 0.0, key=None):
        h = self.act(self.up(x))
        return dropout(self.down(h), dropout_rate, key)


def sinusoidal_positions(length: int, dim: int) -> jnp.ndarray:
    """The original Transformer's table: PE[p, 2i] = sin(p / 10000^(2i/d)), PE[p, 2i+1] = cos(...)."""
    pos = jnp.arange(length, dtype=jnp.float32)[:, None]
    inv = jnp.exp(-math.log(10000.0) * jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)
    table = jnp.zeros((length, dim), jnp.float32)
    table = table.at[:, 0::2].set(jnp.sin(pos * inv))
    return table.at[:, 1::2].set(jnp.cos(pos * inv[: dim // 2]))


def apply_rope(x, positions, theta: float = 10000.0):
    """Rotary position embedding, half-split convention (GPT-NeoX / Llama in HF).

    x: [B, T, H, Dh]; positions: [B, T]. Pairs (x[i], x[i + Dh/2]) rotate by positions * theta^(-2i/Dh).
    """
    dh = x.shape[-1]
    inv = theta ** (-jnp.arange(0, dh, 2, dtype=jnp.float32) / dh)  # [Dh/2]
    angle = positions.astype(jnp.float32)[..., None] * inv  # [B, T, Dh/2]
    sin, cos = jnp.sin(angle)[:, :, None, :], jnp.cos(angle)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)
