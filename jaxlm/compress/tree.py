"""Small helpers over nested parameter dicts (the pure-dict form of an NNX state)."""

from __future__ import annotations

import jax
import numpy as np

from jaxlm.config import BLOCK_KERNELS


def walk(tree: dict, path=()):
    """Yield (path, node) for every dict node, parents first."""
    yield path, tree
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from walk(v, path + (k,))


def copy_dicts(tree: dict) -> dict:
    """A copy of the dict structure (leaves shared), safe to modify node by node."""
    return {k: copy_dicts(v) if isinstance(v, dict) else v for k, v in tree.items()}


def get(tree: dict, path):
    for k in path:
        tree = tree[k]
    return tree


def merge(a: dict, b: dict) -> dict:
    """Union of two trees with disjoint leaves (e.g. trainable and frozen parameters)."""
    out = dict(a)
    for k, v in b.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def overlay(fresh: dict, base: dict) -> dict:
    """``fresh`` with each leaf that ``base`` has at the same path and shape taken from ``base``,
    in ``fresh``'s dtype (pretrained weights into a model with new parts, e.g. adapters or another
    head; a bfloat16 checkpoint into float32 training parameters)."""
    out = {}
    for k, v in fresh.items():
        b = base.get(k) if isinstance(base, dict) else None
        if isinstance(v, dict):
            out[k] = overlay(v, b if isinstance(b, dict) else {})
        else:
            out[k] = b.astype(v.dtype) if b is not None and not isinstance(b, dict) and b.shape == v.shape else v
    return out


def split(tree: dict, keep, path=()) -> tuple[dict, dict]:
    """(leaves where keep(path) is True, the others), both as trees without empty dicts."""
    yes, no = {}, {}
    for k, v in tree.items():
        p = path + (k,)
        if isinstance(v, dict):
            y, n = split(v, keep, p)
            if y:
                yes[k] = y
            if n:
                no[k] = n
        elif keep(p):
            yes[k] = v
        else:
            no[k] = v
    return yes, no


def count_params(params) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


def nbytes(params) -> int:
    return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(params)))


def block_kernels(tree: dict):
    """(path, node) of each Dense node of the blocks (q, k, v, o, up, down), either layout."""
    for path, node in walk(tree):
        if path and path[-1] in BLOCK_KERNELS and "layers" in path and (
                "kernel" in node or "kernel_a" in node):
            yield path, node


def stacked(path) -> bool:
    """Whether a block parameter at ``path`` carries a leading layers axis (scan layout)."""
    i = path.index("blocks")
    return not isinstance(path[i + 1], int)
