"""The pure jitted steps: ``train_step(state, batch) -> (state, metrics)`` and the evaluation step,
of any objective (``jaxlm.objectives``).

Dimension legend: B batch rows, M micro-batches, T length.

Randomness is explicit: the step's key is fold_in(seed, step), so a resumed run draws exactly the
dropout and MLM masks the uninterrupted run would have.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxlm.compress import tree
from jaxlm.compress.prune import apply_masks
from jaxlm.objectives import Objective


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """Static settings of the jitted steps: the objective (its own static settings), the
    micro-batches per step and the seed of the step keys."""

    objective: Objective
    grad_accum: int = 1
    seed: int = 0


def ratios(loss_sum, count, stats) -> dict:
    """Metrics from sums: the loss per scored token (or example) and every stat's numerator /
    denominator."""
    out = {"loss": loss_sum / jnp.maximum(count, 1.0)}
    out.update({k: num / jnp.maximum(den, 1.0) for k, (num, den) in stats.items()})
    return out


def make_train_step(graphdef, tx, spec: StepSpec, lr_fn, *, dropout: bool = True, state_sharding=None,
                    second_graphdef=None):
    """``train_step(state, batch) -> (state, metrics)``; batch: the objective's rows (a [B, T + 1]
    int32 array or a dict of arrays); donated state.

    ``state_sharding`` (a tree like the state) pins the output layout on a mesh.
    """

    objective = spec.objective

    def step(state, batch, frozen=None, masks=None, second_params=None):
        """``frozen``: parameters that take part in the model but are not trained (e.g. the base
        under LoRA adapters); ``masks``: pruning masks, re-applied after every update;
        ``second_params``: a second model's, never differentiated (the objective's ``fixed_model``:
        distill's teacher, dpo's reference)."""
        def loss_fn(params, rows, key):
            k_drop, k_mask = jax.random.split(key)
            full = params if frozen is None else tree.merge(params, frozen)
            second = objective.second(graphdef, full, second_graphdef, second_params)
            s, n, stats = objective.loss_sums(nnx.merge(graphdef, full), rows, key=k_drop if dropout else None,
                                              mask_key=k_mask, second=second)
            return s, (n, stats)

        params, opt_state, step = state["params"], state["opt_state"], state["step"]
        key = jax.random.fold_in(jax.random.key(spec.seed), step)
        micro = jax.tree.map(lambda x: x.reshape(spec.grad_accum, -1, *x.shape[1:]), batch)  # [M, B / M, ...]
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

        def accumulate(carry, xs):
            rows, i = xs
            (l, (n, stats)), g = grad_fn(params, rows, jax.random.fold_in(key, i))
            return jax.tree.map(jnp.add, carry, (g, l, n, stats)), None

        if spec.grad_accum == 1:  # no zero-filled accumulator: one less pass over the gradients
            (l, (n, stats)), g = grad_fn(params, batch, jax.random.fold_in(key, 0))
        else:
            first = jax.tree.map(lambda x: x[0], micro)
            (l_s, (n_s, stats_s)), g_s = jax.eval_shape(grad_fn, params, first, key)
            zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (g_s, l_s, n_s, stats_s))
            (g, l, n, stats), _ = jax.lax.scan(accumulate, zeros, (micro, jnp.arange(spec.grad_accum)))
        # Sums over all micro-batches, divided once: the same as one big batch.
        grads = jax.tree.map(lambda x: x / jnp.maximum(n, 1.0), g)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        if masks is not None:
            params = apply_masks(params, masks)
        metrics = {**ratios(l, n, stats), "grad_norm": optax.tree.norm(grads), "lr": lr_fn(step)}
        return {"params": params, "opt_state": opt_state, "step": step + 1}, metrics

    out = None if state_sharding is None else (state_sharding, None)
    return jax.jit(step, donate_argnums=0, out_shardings=out)


def make_eval_step(graphdef, spec: StepSpec, second_graphdef=None):
    """``eval_step(params, batch, index, second_params=None) -> the objective's eval sums`` (loss
    sum, count, stats[, more]); no dropout, fixed MLM masks. ``second_params``: see make_train_step."""
    objective = spec.objective

    def step(params, batch, index, second_params=None):
        mask_key = jax.random.fold_in(jax.random.key(spec.seed + 1), index)
        second = objective.second(graphdef, params, second_graphdef, second_params)
        return objective.eval_sums(nnx.merge(graphdef, params), batch, mask_key=mask_key, second=second)

    return jax.jit(step)
