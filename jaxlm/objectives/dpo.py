"""Direct preference optimisation (``train.objective=dpo``, Rafailov et al. 2023) against a frozen
reference model, with an optional SFT term on the chosen responses (RPO)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.compress import tree
from jaxlm.compress.distill import check_teacher
from jaxlm.compress.lora import adapters_off
from jaxlm.instruct import example_rows
from jaxlm.io.read import read_base
from jaxlm.objectives import register
from jaxlm.objectives.base import Objective, check_seq_len, forward, token_nll
from jaxlm.sharding import check_model_fits, param_shardings
from jaxlm.transformer import model_graphdef, params_for


def sequence_logps(model, rows):
    """(sum of log p over weighted tokens, their NLL sum, their count), each [B, 2], of DPO pairs:
    rows {"inputs", "targets", "weights", "segments"} of [B, 2, T] (chosen, rejected)."""
    flat = {k: v.reshape(-1, v.shape[-1]) for k, v in rows.items()}
    nll, _ = token_nll(forward(model, flat["inputs"], flat["segments"]), flat["targets"])
    w = flat["weights"].astype(jnp.float32)
    shape = rows["weights"].shape[:2]
    s = (nll * w).sum(-1).reshape(shape)
    return -s, s, w.sum(-1).reshape(shape)


def dpo_sums(model, reference, rows, beta: float, sft_weight: float = 0.0):
    """DPO: -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))) per pair, with sequence
    log-probs over the response tokens only; ``sft_weight`` adds that times the chosen response's
    mean token NLL (RPO, Pang et al. 2024: it keeps the chosen responses likely, which plain DPO
    lets fall). Returns (loss sum, pairs, stats)."""
    pi, nll, count = sequence_logps(model, rows)
    ref = jax.lax.stop_gradient(sequence_logps(reference, rows)[0])
    rewards = beta * (pi - ref)  # [B, 2]: implicit rewards of chosen, rejected
    margin = rewards[:, 0] - rewards[:, 1]
    real = (count[:, 0] > 0).astype(jnp.float32)  # empty rows (padding a small split) count for nothing
    n = real.sum()
    stats = {"reward_accuracy": (((margin > 0) * real).sum(), n), "reward_margin": ((margin * real).sum(), n),
             "chosen_loss": (nll[:, 0].sum(), count[:, 0].sum())}
    loss = -jax.nn.log_sigmoid(margin)
    if sft_weight:
        loss = loss + sft_weight * nll[:, 0] / jnp.maximum(count[:, 0], 1.0)
    return (loss * real).sum(), n, stats


@register
@dataclasses.dataclass(frozen=True)
class DPO(Objective):
    """Rows {"inputs", "targets", "weights", "segments"} of [B, 2, T]: (chosen, rejected) pairs,
    one per row; no dropout (the sequence log-probs are compared with the reference's)."""

    name = "dpo"
    packings = ("pad",)
    chat = True
    beta: float  # dpo.* (see DPOConfig)
    sft_weight: float

    @classmethod
    def from_run(cls, cfg, tokenizer, second):
        return cls(cfg.dpo.beta, cfg.dpo.sft_weight)

    @classmethod
    def scored_by(cls, model_config) -> str:
        raise ValueError("jaxlm eval scores clm / mlm / sft / classify; a dpo run's held-out reward accuracy "
                         "is in its metrics.jsonl (val_reward_accuracy), its loss on the chosen responses "
                         "with train.objective=sft data.path=SFT_DATA")

    @classmethod
    def second_model(cls, cfg, model_cfg, mesh, log, *, graphdef, params, frozen, base_params):
        """(graphdef, params on the mesh, None) of the frozen reference, or None under LoRA from a
        base without adapters (the reference is then the model with its adapters off)."""
        if cfg.dpo.reference:
            r_cfg, r_params, _ = read_base(cfg.dpo.reference, "dpo.reference")
            check_teacher(model_cfg, r_cfg, "dpo.reference")
            check_seq_len(cfg.data.seq_len, r_cfg.context)
            r_cfg = r_cfg.replace(dtype=cfg.train.dtype, scan_layers=model_cfg.scan_layers)
            check_model_fits(r_cfg, mesh)
            log(f"dpo: reference {cfg.dpo.reference}, beta {cfg.dpo.beta}")
            return model_graphdef(r_cfg), jax.device_put(params_for(r_cfg, r_params), param_shardings(r_cfg, mesh)), None
        base_adapters = base_params is not None and any("lora_a" in node for _, node in tree.walk(base_params))
        if cfg.adapt.method == "lora" and not base_adapters:
            log(f"dpo: reference = the base model (LoRA adapters off), beta {cfg.dpo.beta}")
            return None
        if cfg.adapt.method not in ("full", "lora"):
            raise ValueError(f"train.objective=dpo trains with adapt.method=full or lora, not {cfg.adapt.method}")
        # The starting weights, copied before training changes them (a resumed run copies the base
        # again, not the restored weights).
        log(f"dpo: reference = the starting model (a frozen copy), beta {cfg.dpo.beta}")
        full = tree.merge(params, frozen) if frozen is not None else params
        return graphdef, jax.tree.map(jnp.copy, full), None

    def rows(self, cfg, split, tokenizer, *, evaluation=False, template=None, prepared=None, log=None):
        rows = example_rows(cfg.data, split, tokenizer, pairs=True, packing=self.packing(cfg), template=template,
                            log=log, what="dpo")
        return rows.padded(cfg.data.batch_size) if evaluation else rows

    def eval_batches(self, n_rows, batch_size, requested, *, report=False):
        return min(n_rows // batch_size, requested)  # small splits: each row once at most

    def second(self, graphdef, full_params, second_graphdef, second_params):
        """The frozen reference: a model of its own (``second_params``), or, under LoRA, this model
        with its adapters off (no second copy of the weights)."""
        if second_params is not None:
            return nnx.merge(second_graphdef, second_params)
        return nnx.merge(graphdef, jax.lax.stop_gradient(adapters_off(full_params)))

    def loss_sums(self, model, rows, *, key=None, mask_key=None, second=None):
        return dpo_sums(model, second, rows, self.beta, self.sft_weight)
