"""Gemma (``model_type: gemma``): the Llama layout with RMSNorm scales of 1 + weight, token
embeddings times sqrt(d_model), GeGLU (tanh GELU) and tied embeddings; head_dim is its own."""

from __future__ import annotations

from typing import Any

from jaxlm.config import ModelConfig
from jaxlm.io.hf.llama import (BARE, PREFIX, SKIP, check_decoder, decoder_config_from_hf, decoder_config_to_hf,  # noqa: F401
                               decoder_rules)

MODEL_TYPE = "gemma"
ARCHITECTURES = ("GemmaForCausalLM",)

GEMMA = dict(norm_unit_offset=True, embed_scale=True, tie_embeddings=True)


def config_from_hf(hf: dict[str, Any], arch: str) -> ModelConfig:
    if hf.get("attention_bias"):
        raise ValueError("Gemma with attention_bias is not supported")
    act = hf.get("hidden_act", "gelu_pytorch_tanh")
    hf = {**hf, "hidden_act": "gelu_pytorch_tanh" if act == "gelu" else act}  # "gelu" meant tanh (as transformers)
    return decoder_config_from_hf(hf, **GEMMA)


def config_to_hf(c: ModelConfig) -> dict[str, Any]:
    check_decoder(c, "Gemma", norm_position="pre", has_qkv_bias=False, qk_norm=False, sliding_window=None, **GEMMA)
    out = decoder_config_to_hf(c, MODEL_TYPE, ARCHITECTURES[0], attention_bias=False)
    out["hidden_act"] = "gelu_pytorch_tanh" if c.activation == "gelu_tanh" else out["hidden_act"]
    return out


rules = decoder_rules
