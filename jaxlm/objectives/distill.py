"""Knowledge distillation (``train.objective=distill``): the student learns its own token
objective (clm on a decoder, mlm on an encoder) against a teacher's softened distribution
(``compress.distill`` holds the losses); evaluation scores the student's own loss."""

from __future__ import annotations

import dataclasses

import jax
from flax import nnx

from jaxlm.compress import distill
from jaxlm.data import packed_rows
from jaxlm.io.read import read_base
from jaxlm.objectives import register
from jaxlm.objectives.base import Objective, token_sums
from jaxlm.objectives.clm import CLM
from jaxlm.objectives.mlm import MLM, needs_mask
from jaxlm.sharding import check_model_fits, param_shardings
from jaxlm.transformer import model_graphdef, params_for


@register
@dataclasses.dataclass(frozen=True)
class Distill(Objective):
    name = "distill"
    temperature: float  # distill.* (see DistillConfig)
    alpha: float
    attention_weight: float
    layer_pairs: tuple = ()  # (student layer, teacher layer) pairs of the attention term
    base: CLM = CLM()  # the student's own objective: which tokens are scored, and how they are masked

    @classmethod
    def check(cls, cfg, tokenizer) -> None:
        super().check(cfg, tokenizer)
        if not cfg.model.causal:
            needs_mask(cfg, tokenizer)
        if not cfg.distill.teacher:
            raise ValueError("train.objective=distill needs distill.teacher=PATH (any model jaxlm.load accepts)")

    @classmethod
    def second_model(cls, cfg, model_cfg, mesh, log, **_):
        """(graphdef, params on the mesh, layer pairs) of distill.teacher, checked against the student."""
        t_cfg, t_params, _ = read_base(cfg.distill.teacher, "distill.teacher")
        distill.check_teacher(cfg.model, t_cfg)
        t_cfg = t_cfg.replace(dtype=cfg.train.dtype, scan_layers=cfg.model.scan_layers)
        check_model_fits(t_cfg, mesh)
        pairs = distill.layer_pairs(cfg.model.n_layers, t_cfg.n_layers, cfg.distill.layer_map)
        log(f"distilling from {cfg.distill.teacher} ({t_cfg.n_layers} layers, d={t_cfg.d_model}): T="
            f"{cfg.distill.temperature}, alpha={cfg.distill.alpha}, attention weight {cfg.distill.attention_weight}")
        t_params = jax.device_put(params_for(t_cfg, t_params), param_shardings(t_cfg, mesh))
        return model_graphdef(t_cfg), t_params, pairs

    @classmethod
    def from_run(cls, cfg, tokenizer, second):
        dc = cfg.distill
        base = (CLM if cfg.model.causal else MLM).from_run(cfg, tokenizer, None)
        return cls(dc.temperature, dc.alpha, dc.attention_weight, second[2] if second else (), base)

    @classmethod
    def scored_by(cls, model_config) -> str:
        return "clm" if model_config.causal else "mlm"

    def rows(self, cfg, split, tokenizer, *, evaluation=False, template=None, prepared=None, log=None):
        return packed_rows(cfg.data, split, tokenizer, log)

    def second(self, graphdef, full_params, second_graphdef, second_params):
        return None if second_params is None else nnx.merge(second_graphdef, second_params)

    def loss_sums(self, model, rows, *, key=None, mask_key=None, second=None):
        """The distillation loss per scored token against the ``second`` model (the teacher) (without one:
        the student's own loss); the attention term is added as its mean times the number of
        scored tokens."""
        if second is None:
            return self.base.loss_sums(model, rows, key=key, mask_key=mask_key)
        teacher = second
        inputs, targets, weights, segments = self.base.tokens(model, rows, mask_key)
        seg = dict(segment_ids=segments)
        extra = 0.0
        if self.attention_weight > 0:
            h, maps = model.hidden_states(inputs, key=key, need_probs=True, **seg)
            t_h, t_maps = teacher.hidden_states(inputs, need_probs=True, **seg)
            extra = self.attention_weight * distill.attention_mse(maps, t_maps, self.layer_pairs) * weights.sum()
        else:
            h, t_h = model.hidden_states(inputs, key=key, **seg), teacher.hidden_states(inputs, **seg)
        logits = model.head(h)
        per_token = distill.token_losses(logits, teacher.head(t_h), targets, temperature=self.temperature,
                                         alpha=self.alpha)
        return token_sums(logits, per_token, targets, weights, extra)

    def eval_sums(self, model, rows, *, mask_key, second=None) -> tuple:
        return self.base.loss_sums(model, rows, mask_key=mask_key)  # the student's own loss
