"""The pure jitted steps: ``train_step(state, batch) -> (state, metrics)`` and the evaluation step.

Dimension legend: B batch rows, M micro-batches, T length.

Randomness is explicit: the step's key is fold_in(seed, step), so a resumed run draws exactly the
dropout and MLM masks the uninterrupted run would have.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxlm.compress import tree
from jaxlm.compress.prune import apply_masks
from jaxlm.train.objectives import StepSpec, loss_sums

def make_train_step(graphdef, tx, spec: StepSpec, lr_fn, *, dropout: bool = True, state_sharding=None,
                    teacher_graphdef=None):
    """``train_step(state, batch) -> (state, metrics)``; batch: [B, T + 1] int32; donated state.

    ``state_sharding`` (a tree like the state) pins the output layout on a mesh.
    """

    def step(state, batch, frozen=None, masks=None, teacher_params=None):
        """``frozen``: parameters that take part in the model but are not trained (e.g. the base
        under LoRA adapters); ``masks``: pruning masks, re-applied after every update;
        ``teacher_params``: the teacher's (objective=distill), never differentiated."""
        teacher = None if teacher_params is None else nnx.merge(teacher_graphdef, teacher_params)

        def loss_fn(params, rows, key):
            k_drop, k_mask = jax.random.split(key)
            full = params if frozen is None else tree.merge(params, frozen)
            s, n, c = loss_sums(nnx.merge(graphdef, full), rows, spec, key=k_drop if dropout else None,
                                mask_key=k_mask, teacher=teacher)
            return s, (n, c)

        params, opt_state, step = state["params"], state["opt_state"], state["step"]
        key = jax.random.fold_in(jax.random.key(spec.seed), step)
        micro = jax.tree.map(lambda x: x.reshape(spec.grad_accum, -1, *x.shape[1:]), batch)  # [M, B / M, ...]

        def accumulate(carry, xs):
            g_sum, l_sum, n_sum, c_sum = carry
            rows, i = xs
            (l, (n, c)), g = jax.value_and_grad(loss_fn, has_aux=True)(params, rows, jax.random.fold_in(key, i))
            return (jax.tree.map(jnp.add, g_sum, g), l_sum + l, n_sum + n, c_sum + c), None

        if spec.grad_accum == 1:  # no zero-filled accumulator: one less pass over the gradients
            (l, (n, c)), g = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, jax.random.fold_in(key, 0))
        else:
            zeros = jax.tree.map(jnp.zeros_like, params)
            (g, l, n, c), _ = jax.lax.scan(accumulate, (zeros, 0.0, 0.0, 0.0),
                                           (micro, jnp.arange(spec.grad_accum)))
        # Sums over all micro-batches, divided once: the same as one big batch.
        n = jnp.maximum(n, 1.0)
        grads = jax.tree.map(lambda x: x / n, g)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        if masks is not None:
            params = apply_masks(params, masks)
        metrics = {"loss": l / n, "accuracy": c / n, "grad_norm": optax.tree.norm(grads), "lr": lr_fn(step)}
        return {"params": params, "opt_state": opt_state, "step": step + 1}, metrics

    out = None if state_sharding is None else (state_sharding, None)
    return jax.jit(step, donate_argnums=0, out_shardings=out)


def make_eval_step(graphdef, spec: StepSpec):
    """``eval_step(params, batch, index) -> (nll sum, count, correct)``; no dropout, fixed MLM masks."""

    def step(params, batch, index):
        mask_key = jax.random.fold_in(jax.random.key(spec.seed + 1), index)
        model = nnx.merge(graphdef, params)
        if spec.objective == "classify":  # also a confusion matrix [true, predicted] for macro-F1
            c = model.config.num_labels
            pred = jnp.argmax(model(batch["ids"], batch["mask"]), axis=-1)
            confusion = jax.nn.one_hot(batch["label"], c).T @ jax.nn.one_hot(pred, c)
            return (*loss_sums(model, batch, spec), confusion)
        return loss_sums(model, batch, spec, mask_key=mask_key)

    return jax.jit(step)
