"""Pruning. Unstructured: magnitude masks over the block kernels (global or per layer), applied
in one shot or gradually during fine-tuning (masked weights are kept exactly zero). Structured:
removing whole attention heads by an importance score, giving a smaller model config.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.compress.tree import block_kernels, copy_dicts


def check_sparsity(sparsity: float) -> None:
    if not 0 <= sparsity < 1:
        raise ValueError(f"sparsity={sparsity} must be in [0, 1): the fraction of weights set to zero")


def _kernel_layers(params, targets):
    """[(path, per-layer kernel arrays [in..., out...] as numpy, stacked?)]."""
    from jaxlm.compress.tree import stacked

    out = []
    for path, node in block_kernels(params):
        if path[-1] in targets and "kernel" in node:
            w = np.asarray(node["kernel"])
            st = stacked(node, path)
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
