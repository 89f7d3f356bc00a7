"""Pruning. Unstructured: magnitude masks over the block kernels (global or per layer), applied
in one shot or gradually during fine-tuning (masked weights are kept exactly zero). Structured:
removing whole attention heads by an importance score, giving a smaller model config.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.compress.tree import block_kernels, copy_dicts, stacked
from jaxlm.transformer import params_for, stack_layers


def check_sparsity(sparsity: float) -> None:
    if not 0 <= sparsity < 1:
        raise ValueError(f"sparsity={sparsity} must be in [0, 1): the fraction of weights set to zero")


def _kernel_layers(params, targets):
    """[(path, per-layer kernel arrays [in..., out...] as numpy, stacked?)]."""
    out = []
    for path, node in block_kernels(params):
        if path[-1] in targets and "kernel" in node:
            w = np.asarray(node["kernel"])
            st = stacked(path)
            out.append((path, [w[i] for i in range(w.shape[0])] if st else [w], st))
    return out


def magnitude_masks(params, sparsity: float, *, scope: str = "global", targets=("q", "k", "v", "o", "up", "down")):
    """Boolean masks (True = kept) for the block kernels: the ``sparsity`` fraction with the
    smallest |w| is dropped, over all of them at once (global) or in each kernel of each layer."""
    check_sparsity(sparsity)
    if scope not in ("global", "layer"):
        raise ValueError(f"scope={scope!r} must be 'global' or 'layer'")
    kernels = _kernel_layers(params, targets)
    if not kernels:
        raise ValueError(f"no kernels named {', '.join(targets)} to prune")
    masks = {}
    if scope == "global":
        flat = np.concatenate([np.abs(w).ravel() for _, ws, _ in kernels for w in ws])
        k = int(round(sparsity * flat.size))
        order = np.argsort(flat, kind="stable")  # ties broken by position: exactly k dropped
        keep = np.ones(flat.size, bool)
        keep[order[:k]] = False
        pos = 0
        for path, ws, st in kernels:
            ms = []
            for w in ws:
                ms.append(keep[pos:pos + w.size].reshape(w.shape))
                pos += w.size
            masks[path] = np.stack(ms) if st else ms[0]
    else:
        for path, ws, st in kernels:
            ms = []
            for w in ws:
                a = np.abs(w).ravel()
                keep = np.ones(a.size, bool)
                keep[np.argsort(a, kind="stable")[:int(round(sparsity * a.size))]] = False
                ms.append(keep.reshape(w.shape))
            masks[path] = np.stack(ms) if st else ms[0]
    return _as_tree(masks)


def _as_tree(masks: dict) -> dict:
    tree: dict = {}
    for path, m in masks.items():
        node = tree
        for k in path:
            node = node.setdefault(k, {})
        node["kernel"] = jnp.asarray(m)
    return tree


def apply_masks(params, masks):
    """params with every masked weight set to exactly zero (other leaves unchanged)."""
    def go(p, m):
        if not isinstance(m, dict):
            return jnp.where(m, p, jnp.zeros((), p.dtype))
        return {k: go(p[k], m[k]) if k in m else p[k] for k in p}
    return go(params, masks)


def sparsity_at(step: int, *, final: float, start: int, end: int, initial: float = 0.0) -> float:
    """Gradual schedule (Zhu & Gupta 2017): s = final + (initial - final) (1 - progress)^3."""
    if step <= start:
        return initial if step == start else 0.0
    progress = min(1.0, (step - start) / max(1, end - start))
    return final + (initial - final) * (1.0 - progress) ** 3


def measured_sparsity(params, targets=("q", "k", "v", "o", "up", "down")) -> float:
    zeros = total = 0
    for _, ws, _ in _kernel_layers(params, targets):
        for w in ws:
            zeros += int(np.sum(w == 0))
            total += w.size
    return zeros / max(total, 1)


# Structured: attention heads -------------------------------------------------------------------

def head_importance(params) -> np.ndarray:
    """[L, H] importance of each head: ||W_v[:, h]|| * ||W_o[h]|| (Frobenius norms), the size of
    what the head can write into the residual stream."""
    attn = stack_layers(params)["layers"]["blocks"]["attn"]
    v, o = np.asarray(attn["v"]["kernel"]), np.asarray(attn["o"]["kernel"])  # [L, D, H, Dh], [L, H, Dh, D]
    return np.sqrt((v ** 2).sum(axis=(1, 3))) * np.sqrt((o ** 2).sum(axis=(2, 3)))


def prune_heads(config, params, keep: int):
    """(config with n_heads=keep, params keeping the ``keep`` most important heads of each layer).

    Every layer keeps the same number of heads (layers are stored stacked), chosen per layer by
    ``head_importance``. Multi-head attention only (no grouped-query kv heads).
    """
    h = config.n_heads
    if config.kv_heads != h:
        raise ValueError("head pruning needs multi-head attention (n_kv_heads == n_heads)")
    if not 1 <= keep <= h:
        raise ValueError(f"keep={keep} heads must be in [1, {h}]")
    if config.quantize != "none" or config.lora_rank or config.factor_rank:
        raise ValueError("prune heads of a plain model (before quantizing, factoring or adding LoRA)")
    whole = stack_layers(params)
    order = np.argsort(-head_importance(whole), axis=1, kind="stable")[:, :keep]
    chosen = np.sort(order, axis=1)  # [L, keep], in the original order
    attn = copy_dicts(whole["layers"]["blocks"]["attn"])

    def take(x, axis):  # per layer, the chosen heads along ``axis`` (counted after the layers axis)
        x = np.asarray(x)
        idx = chosen.reshape(chosen.shape + (1,) * (x.ndim - 2))
        idx = np.moveaxis(idx, 1, axis + 1) if axis else idx
        return jnp.asarray(np.take_along_axis(x, np.broadcast_to(idx, x.shape[:axis + 1] + (keep,) + x.shape[axis + 2:]),
                                              axis=axis + 1))

    for name in ("q", "k", "v"):
        attn[name]["kernel"] = take(attn[name]["kernel"], 1)  # [L, D, H, Dh]
        if "bias" in attn[name]:
            attn[name]["bias"] = take(attn[name]["bias"], 0)  # [L, H, Dh]
    attn["o"]["kernel"] = take(attn["o"]["kernel"], 0)  # [L, H, Dh, D]
    out = copy_dicts(whole)
    out["layers"]["blocks"]["attn"] = attn
    new_cfg = config.replace(n_heads=keep, n_kv_heads=None, head_dim=config.dim_per_head)
    return new_cfg, params_for(new_cfg, out), chosen
