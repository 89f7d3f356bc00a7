"""LoRA (Hu et al. 2021): W x + (alpha / r) B A x with A [in, r], B [r, out] trainable, W frozen.

Adapters are part of the model (``ModelConfig.lora_rank / lora_alpha / lora_targets``: Dense adds
the low-rank path), so training, checkpoints and ``jaxlm.load`` handle them like any parameter;
``jaxlm train adapt.method=lora`` updates only them. ``merge_lora`` folds them into the kernels
for export: a plain model with the same outputs.
"""

from __future__ import annotations

import jax.numpy as jnp

from jaxlm.compress.tree import copy_dicts, walk


def is_adapter(path) -> bool:
    return bool(path) and path[-1] in ("lora_a", "lora_b")


def adapters_off(params):
    """``params`` with every adapter zero: the base model's outputs (B A x = 0), e.g. DPO's
    reference under LoRA without a second copy of the weights."""
    return {k: adapters_off(v) if isinstance(v, dict) else (jnp.zeros_like(v) if is_adapter((k,)) else v)
            for k, v in params.items()}


def merge_lora(config, params):
    """(config without adapters, params with W + (alpha / r) A @ B in each adapted kernel)."""
    if not config.lora_rank:
        return config, params
    if config.quantize != "none":
        raise ValueError("merge LoRA adapters before quantizing (the kernels are int8 here)")
    out = copy_dicts(params)
    scale = config.lora_alpha / config.lora_rank
    for _, node in walk(out):
        if "lora_a" in node:
            node["kernel"] = merged_kernel(node["kernel"], node.pop("lora_a"), node.pop("lora_b"), scale)
    return config.replace(lora_rank=0), out


def merged_kernel(kernel, a, b, scale: float):
    """W + scale * A @ B in W's shape and dtype; A [(L,) in, r], B [(L,) r, out] (stacked or one layer)."""
    delta = jnp.einsum("...ir,...ro->...io", a, b) * scale  # [(L,) in, out]
    return kernel + delta.reshape(kernel.shape).astype(kernel.dtype)
