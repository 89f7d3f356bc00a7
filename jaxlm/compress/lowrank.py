"""Low-rank factorization: a kernel W [in, out] becomes A [in, r] @ B [r, out] from its SVD
(A = U_r sqrt(S_r), B = sqrt(S_r) V_r^T), the best rank-r approximation in Frobenius norm.

The rank is given directly or chosen as the smallest that keeps ``energy`` of the squared singular
values of every chosen kernel; layers share one rank (they are stored stacked), so the largest
needed is used. A checkpoint -> smaller checkpoint transform (``jaxlm lowrank``).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxlm.compress.tree import block_kernels, copy_dicts, stacked


def _matrices(node, n_in, is_stacked):
    w = np.asarray(node["kernel"], np.float32)
    if not is_stacked:
        w = w[None]
    return w.reshape(w.shape[0], int(np.prod(w.shape[1:1 + n_in])), -1)  # [L, in, out]


def factorize(config, params, *, targets, rank: int | None = None, energy: float | None = None):
    """(config with factor_rank / factor_targets, params with kernel_a / kernel_b factors)."""
    targets = tuple(targets.split(",")) if isinstance(targets, str) else tuple(targets)
    if (rank is None) == (energy is None):
        raise ValueError("give either a rank or an energy to keep (e.g. --energy 0.9)")
    if energy is not None and not 0 < energy <= 1:
        raise ValueError(f"energy={energy} must be in (0, 1]: the fraction of squared singular values kept")
    if config.factor_rank or config.quantize != "none" or config.lora_rank:
        raise ValueError("factorize a plain model (no factors, int8 kernels or LoRA adapters yet)")
    config.replace(factor_rank=1, factor_targets=targets)  # validates the target names
    n_in = {"o": 2}
    svds = []
    for path, node in block_kernels(params):
        if path[-1] in targets:
            st = stacked(path)
            w = _matrices(node, n_in.get(path[-1], 1), st)
            u, s, vt = np.linalg.svd(w, full_matrices=False)  # batched over layers
            svds.append((path, node, st, u, s, vt))
    if energy is not None:
        need = 1
        for *_, s, _ in svds:
            frac = np.cumsum(s ** 2, axis=-1) / np.sum(s ** 2, axis=-1, keepdims=True)
            need = max(need, int(np.max(np.sum(frac < energy - 1e-7, axis=-1))) + 1)
        rank = need
    new_cfg = config.replace(factor_rank=int(rank), factor_targets=targets)  # checks rank <= min(in, out)
    out = copy_dicts(params)
    for path, _, st, u, s, vt in svds:
        node = out
        for k in path:
            node = node[k]
        kernel = node.pop("kernel")
        k_in = n_in.get(path[-1], 1)
        root = np.sqrt(s[..., :rank])
        a = u[..., :rank] * root[:, None, :]  # [L, in, r]
        b = root[:, :, None] * vt[:, :rank]  # [L, r, out]
        lead = kernel.shape[:1] if st else ()
        body = kernel.shape[1:] if st else kernel.shape
        a = a.reshape(*lead, *body[:k_in], rank) if st else a[0].reshape(*body[:k_in], rank)
        b = b.reshape(*lead, rank, *body[k_in:]) if st else b[0].reshape(rank, *body[k_in:])
        node["kernel_a"], node["kernel_b"] = jnp.asarray(a), jnp.asarray(b)
    return new_cfg, out
