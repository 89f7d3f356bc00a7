"""Optimizers: optax chains with warmup + cosine decay, clipping and a weight-decay mask."""

from __future__ import annotations

import jax
import optax

from jaxlm.config import OptimConfig


def schedule(cfg: OptimConfig, total_steps: int):
    """Linear warmup to ``lr`` over ``warmup_steps``, then cosine decay to ``lr * min_lr_ratio``."""
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.lr, warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1), end_value=cfg.lr * cfg.min_lr_ratio)


def decay_mask(params):
    """True for the dense kernels, which get weight decay; norms, biases and embeddings do not.

    Decided by name, not rank: stacked layers make norm scales and biases 2-D or more.
    """
    def decays(path, leaf):
        return str(getattr(path[-1], "key", path[-1])) == "kernel"

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    lr = schedule(cfg, total_steps)
    if cfg.name == "adamw":
        opt = optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay, mask=decay_mask)
    elif cfg.name == "sgd":
        opt = optax.sgd(lr, momentum=cfg.b1)
    else:
        opt = optax.adafactor(lr)
    return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), opt) if cfg.clip_norm else opt
