"""Building blocks shared by every model family: dense, embeddings, norms, MLP, positions.

Dimension legend: B batch, T length, D model, F mlp, V vocab, H heads, Dh head dim.
Parameters carry logical axis names (``out_sharding`` metadata); sharding.py maps them to a mesh.
Norms and softmax run in float32 whatever the compute dtype.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlm import kernels

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
    """y = einsum(spec, x, kernel) + bias, with a kernel of any rank (e.g. D -> H x Dh).

    The kernel's contracted (fan-in) dims lead, its output (fan-out) dims follow. Optional forms
    (see jaxlm/compress/): ``factor_rank`` stores the kernel as factors ``kernel_a`` [in..., r] @
    ``kernel_b`` [r, out...]; ``quantize="int8"`` stores int8 ``kernel`` values with a float
    ``scale`` per output channel (W = kernel * scale); ``lora_rank`` adds trainable ``lora_a``
    [in, r] and ``lora_b`` [r, out] (nnx.LoRAParam) whose product, times lora_alpha / lora_rank,
    is added to the kernel's output.
    """

    def __init__(self, spec: str, kernel_shape, kernel_axes: Axes, *, use_bias: bool, std: float,
                 dtype, rngs: nnx.Rngs, lora_rank: int = 0, lora_alpha: float = 16.0,
                 factor_rank: int = 0, quantize: str = "none"):
        self.spec = spec
        self.dtype = dtype
        kernel_letters, out_letters = spec.split(",")[1].split("->")
        self.n_in = n_in = sum(c not in out_letters for c in kernel_letters)  # contracted dims lead
        shape, axes = tuple(kernel_shape), tuple(kernel_axes)
        self.fan_in, self.fan_out = math.prod(shape[:n_in]), math.prod(shape[n_in:])
        self.factored = factor_rank > 0
        self.quantized = quantize == "int8"
        if self.factored:
            self.kernel_a = param(rngs.params(), (*shape[:n_in], factor_rank), (*axes[:n_in], None), std=std)
            self.kernel_b = param(rngs.params(), (factor_rank, *shape[n_in:]), (None, *axes[n_in:]), std=std)
        elif self.quantized:
            self.kernel = nnx.Param(jnp.zeros(shape, jnp.int8), out_sharding=axes, eager_sharding=False)
            self.scale = param(None, shape[n_in:], axes[n_in:], "ones")
        else:
            self.kernel = param(rngs.params(), shape, axes, std=std)
        # The bias spans the kernel dims that survive into the output (e.g. H, Dh for D -> H x Dh).
        keep = [i for i, c in enumerate(kernel_letters) if c in out_letters]
        self.bias = (param(None, tuple(shape[i] for i in keep), tuple(axes[i] for i in keep), "zeros")
                     if use_bias else None)
        self.lora_scale = lora_alpha / lora_rank if lora_rank else 0.0
        if lora_rank:  # A random, B zero: the adapted model starts equal to the base
            a = jax.random.normal(rngs.params(), (self.fan_in, lora_rank), jnp.float32) / math.sqrt(self.fan_in)
            self.lora_a = nnx.LoRAParam(a, out_sharding=(None, None), eager_sharding=False)
            self.lora_b = nnx.LoRAParam(jnp.zeros((lora_rank, self.fan_out), jnp.float32),
                                        out_sharding=(None, None), eager_sharding=False)

    def __call__(self, x):
        x = x.astype(self.dtype)
        x_letters, rest = self.spec.split(",")
        k_letters, out_letters = rest.split("->")
        n_in = self.n_in
        plain = x_letters[-n_in:] == k_letters[:n_in] and out_letters == x_letters[:-n_in] + k_letters[n_in:]
        if plain:
            # A plain 2-D matmul over reshaped (bitcast) operands: XLA:CPU lays out multi-axis
            # einsums with extra transposes and copies, most of all in the backward pass.
            lead = x.shape[:-n_in]
            x2 = x.reshape(-1, self.fan_in)
            if self.factored:
                a = self.kernel_a[...].astype(self.dtype)
                y = (x2 @ a.reshape(self.fan_in, -1)) @ self.kernel_b[...].astype(self.dtype).reshape(-1, self.fan_out)
                out_shape = self.kernel_b.shape[1:]
            elif self.quantized:  # (x @ q) * s == x @ (q * s) for one scale per output channel
                q = self.kernel[...]
                y = (x2 @ q.reshape(self.fan_in, self.fan_out).astype(self.dtype)) * \
                    self.scale[...].reshape(self.fan_out).astype(self.dtype)
                out_shape = q.shape[n_in:]
            else:
                kernel = self.kernel[...].astype(self.dtype)
                y = kernels.matmul(x2, kernel.reshape(self.fan_in, self.fan_out))
                out_shape = kernel.shape[n_in:]
            if self.lora_scale:
                y = y + self.lora_scale * ((x2 @ self.lora_a[...].astype(self.dtype)) @ self.lora_b[...].astype(self.dtype))
            y = y.reshape(*lead, *out_shape)
        else:
            if self.factored or self.quantized or self.lora_scale:
                raise NotImplementedError(f"factored / int8 / LoRA kernels need a plain matmul spec, not {self.spec}")
            y = jnp.einsum(self.spec, x, self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class Norm(nnx.Module):
    """LayerNorm (scale and bias) or RMSNorm (scale only), computed in float32.

    ``unit_offset``: the scale is 1 + weight, the weight starting at 0 (Gemma's RMSNorm).
    """

    def __init__(self, dim: int, kind: str, eps: float, *, unit_offset: bool = False, axis: str = "embed"):
        self.kind = kind
        self.eps = eps
        self.offset = 1.0 if unit_offset else 0.0
        self.scale = param(None, (dim,), (axis,), "zeros" if unit_offset else "ones")
        self.bias = param(None, (dim,), (axis,), "zeros") if kind == "layernorm" else None

    def __call__(self, x):
        dtype = x.dtype
        x = x.astype(jnp.float32)
        if self.kind == "layernorm":
            x = x - x.mean(-1, keepdims=True)
        x = x * jax.lax.rsqrt(jnp.square(x).mean(-1, keepdims=True) + self.eps)
        x = x * (self.offset + self.scale[...]) if self.offset else x * self.scale[...]
        if self.bias is not None:
            x = x + self.bias[...]
        return x.astype(dtype)


class Embed(nnx.Module):
    """Lookup table [N, D]; ``attend`` gives the tied output projection [..., D] -> [..., N].

    ``quantize="int8"``: int8 rows with one float scale per row (per output channel of ``attend``).
    """

    def __init__(self, num: int, dim: int, axes: Axes, *, std: float, dtype, rngs: nnx.Rngs,
                 quantize: str = "none"):
        self.dtype = dtype
        self.quantized = quantize == "int8"
        if self.quantized:
            self.embedding = nnx.Param(jnp.zeros((num, dim), jnp.int8), out_sharding=axes, eager_sharding=False)
            self.scale = param(None, (num,), axes[:1], "ones")
        else:
            self.embedding = param(rngs.params(), (num, dim), axes, std=std)

    def __call__(self, ids):
        rows = jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)
        if self.quantized:
            rows = rows * jnp.take(self.scale[...], ids, axis=0)[..., None].astype(self.dtype)
        return rows

    def attend(self, x):
        # As a 2-D matmul: the einsum form made XLA:CPU transpose the [B*T, V] logit gradient.
        e = self.embedding[...].astype(self.dtype)
        y = kernels.matmul(x.astype(self.dtype).reshape(-1, e.shape[1]), e, transpose=True)
        if self.quantized:
            y = y * self.scale[...].astype(self.dtype)
        return y.reshape(*x.shape[:-1], e.shape[0])


ACTIVATIONS = {
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}


class MLP(nnx.Module):
    """Position-wise feed-forward, D -> F -> D: down(act(up(x))), or gated (SwiGLU / GeGLU)
    down(act(gate(x)) * up(x))."""

    def __init__(self, d: int, f: int, activation: str, *, use_bias: bool, std: float, dtype,
                 rngs: nnx.Rngs, gated: bool = False, options=None):
        self.act = ACTIVATIONS[activation]
        options = options or (lambda name: {})
        dense = dict(use_bias=use_bias, std=std, dtype=dtype, rngs=rngs)
        self.up = Dense("btd,df->btf", (d, f), ("embed", "mlp"), **dense, **options("up"))
        self.gate = Dense("btd,df->btf", (d, f), ("embed", "mlp"), **dense, **options("gate")) if gated else None
        self.down = Dense("btf,fd->btd", (f, d), ("mlp", "embed"), **dense, **options("down"))

    def __call__(self, x, dropout_rate: float = 0.0, key=None):
        h = self.act(self.up(x)) if self.gate is None else self.act(self.gate(x)) * self.up(x)
        return dropout(self.down(h), dropout_rate, key)


def dense_options(cfg, name: str | None = None) -> dict:
    """Dense keyword arguments from the config's compression / adaptation fields for a kernel
    (``name``: q, k, v, o, up, down for block kernels; None for heads)."""
    out = {"quantize": cfg.quantize}
    if name is not None and cfg.lora_rank and name in cfg.lora_targets:
        out.update(lora_rank=cfg.lora_rank, lora_alpha=cfg.lora_alpha)
    if name is not None and cfg.factor_rank and name in cfg.factor_targets:
        out.update(factor_rank=cfg.factor_rank)
    return out


def sinusoidal_positions(length: int, dim: int) -> jnp.ndarray:
    """The original Transformer's table: PE[p, 2i] = sin(p / 10000^(2i/d)), PE[p, 2i+1] = cos(...)."""
    pos = jnp.arange(length, dtype=jnp.float32)[:, None]
    inv = jnp.exp(-math.log(10000.0) * jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)
    table = jnp.zeros((length, dim), jnp.float32)
    table = table.at[:, 0::2].set(jnp.sin(pos * inv))
    return table.at[:, 1::2].set(jnp.cos(pos * inv[: dim // 2]))


def rope_frequencies(head_dim: int, theta: float = 10000.0, scaling: str = "none", factor: float = 1.0,
                     low_freq_factor: float = 1.0, high_freq_factor: float = 4.0,
                     original_max_len: int = 8192) -> np.ndarray:
    """The rotation frequencies theta^(-2i/Dh) [Dh/2] (float32), optionally rescaled for longer
    contexts: "linear" divides all by ``factor``; "llama3" (Llama 3.1) divides the low frequencies
    (wavelength past original_max_len / low_freq_factor) by ``factor``, keeps the high ones
    (wavelength under original_max_len / high_freq_factor) and blends those in between."""
    inv = (1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)).astype(np.float32)
    if scaling == "linear":
        return (inv / np.float32(factor)).astype(np.float32)
    if scaling == "llama3":
        low_wavelen, high_wavelen = original_max_len / low_freq_factor, original_max_len / high_freq_factor
        wavelen = np.float32(2 * math.pi) / inv
        scaled = np.where(wavelen > low_wavelen, inv / np.float32(factor), inv).astype(np.float32)
        smooth = (original_max_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        blended = (1 - smooth) * scaled / np.float32(factor) + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return np.where(medium, blended, scaled).astype(np.float32)
    return inv


def apply_rope(x, positions, theta: float | np.ndarray = 10000.0):
    """Rotary position embedding, half-split convention (GPT-NeoX / Llama in HF).

    x: [B, T, H, Dh]; positions: [B, T]. Pairs (x[i], x[i + Dh/2]) rotate by positions * inv[i], where
    inv = theta^(-2i/Dh) for a number ``theta``, or ``theta`` itself when it is the frequency array
    (``rope_frequencies``).
    """
    dh = x.shape[-1]
    inv = jnp.asarray(rope_frequencies(dh, theta) if np.ndim(theta) == 0 else theta, jnp.float32)  # [Dh/2]
    angle = positions.astype(jnp.float32)[..., None] * inv  # [B, T, Dh/2]
    sin, cos = jnp.sin(angle)[:, :, None, :], jnp.cos(angle)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)
