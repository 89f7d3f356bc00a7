"""Gemma 2 (``model_type: gemma2``): Gemma plus norms before and after attention and MLP
("sandwich"), alternating sliding-window / global layers, attention-score and final-logit
soft-capping, and scores scaled by ``query_pre_attn_scalar ** -0.5``."""

from __future__ import annotations

from typing import Any

from jaxlm.config import ModelConfig
from jaxlm.io.hf.gemma import GEMMA
from jaxlm.io.hf.llama import (BARE, PREFIX, SKIP, check_decoder, decoder_config_from_hf, decoder_config_to_hf,  # noqa: F401
                               decoder_rules, layer_types_to_hf, windows_from_hf)

MODEL_TYPE = "gemma2"
ARCHITECTURES = ("Gemma2ForCausalLM",)


def config_from_hf(hf: dict[str, Any], arch: str) -> ModelConfig:
    if hf.get("attention_bias"):
        raise ValueError("Gemma 2 with attention_bias is not supported")
    if not hf.get("layer_types"):  # hub configs: even layers slide, odd layers see everything
        hf = {**hf, "layer_types": ["sliding_attention" if i % 2 == 0 else "full_attention"
                                    for i in range(hf["num_hidden_layers"])]}
    scalar = hf.get("query_pre_attn_scalar")
    return decoder_config_from_hf(
        hf, **GEMMA, norm_position="sandwich", **windows_from_hf(hf, hf.get("sliding_window")),
        attn_softcap=hf.get("attn_logit_softcapping"), final_softcap=hf.get("final_logit_softcapping"),
        query_pre_attn_scalar=None if scalar is None else float(scalar))


def config_to_hf(c: ModelConfig) -> dict[str, Any]:
    check_decoder(c, "Gemma 2", norm_position="sandwich", has_qkv_bias=False, qk_norm=False, **GEMMA)
    out = decoder_config_to_hf(
        c, MODEL_TYPE, ARCHITECTURES[0], attention_bias=False, sliding_window=c.sliding_window,
        layer_types=layer_types_to_hf(c),
        attn_logit_softcapping=c.attn_softcap, final_logit_softcapping=c.final_softcap,
        query_pre_attn_scalar=_number(c.query_pre_attn_scalar if c.query_pre_attn_scalar is not None else c.dim_per_head))
    out["hidden_activation"] = out.pop("hidden_act")
    return out


rules = decoder_rules


def _number(x):
    """An integral float as an int (transformers' Gemma2Config types query_pre_attn_scalar as int)."""
    return int(x) if float(x).is_integer() else x
