"""int8 weight-only quantization: symmetric, one scale per output channel.

q = round(w / s) in [-127, 127], s = max |w| over a channel's inputs / 127, so |q s - w| <= s / 2.
Dense kernels keep their layout with int8 values and a ``scale`` over the output dims; embedding
tables get one scale per row (a row is an output channel of the tied output projection). Norms,
biases and scales stay float32. The model computes (x @ q) * s, which equals x @ (q s).

Written by hand: qwix (Google's JAX quantization library) targets newer flax / jax internals than
the pinned flax 0.12.8 / jax 0.10.2 expose, and weight-only per-channel int8 is a few lines here.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlm.compress.tree import copy_dicts, stacked, walk
from jaxlm.transformer import abstract_model


def quantize_array(w, axes):
    """(int8 values, float32 scales) of ``w``, reducing |w| over ``axes`` (a channel's inputs)."""
    w = np.asarray(w, np.float32)
    amax = np.max(np.abs(w), axis=axes, keepdims=True)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
    return q, np.squeeze(scale, axis=axes)


def dequantize_array(q, scale, axes):
    return np.asarray(q, np.float32) * np.expand_dims(np.asarray(scale, np.float32), axes)


def quantize_int8(config, params):
    """(config with quantize="int8", params with int8 kernels / embeddings and their scales)."""
    if config.quantize == "int8":
        raise ValueError("this model is int8 already")
    if config.lora_rank:
        raise ValueError("merge the LoRA adapters first (jaxlm export), then quantize")
    qcfg = config.replace(quantize="int8")
    target = nnx.to_pure_dict(nnx.state(abstract_model(qcfg), nnx.Param))  # the int8 layout
    out = copy_dicts(params)
    for path, node in walk(out):
        spec = _node(target, path)
        if spec is None:
            continue
        for name in ("kernel", "embedding"):
            leaf = spec.get(name)
            if name in node and leaf is not None and leaf.dtype == jnp.int8:
                w = node[name]
                n_out = spec["scale"].ndim  # scale spans the output dims (and the layers axis)
                if name == "embedding":
                    axes = (w.ndim - 1,)
                else:
                    lead = 1 if "blocks" in path and stacked(path) else 0
                    axes = tuple(range(lead, w.ndim - (n_out - lead)))
                q, s = quantize_array(w, axes)
                node[name], node["scale"] = jnp.asarray(q), jnp.asarray(s)
    return qcfg, out


def _node(tree, path):
    for k in path:
        if not isinstance(tree, dict) or k not in tree:
            return None
        tree = tree[k]
    return tree if isinstance(tree, dict) else None

