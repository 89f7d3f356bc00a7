"""Mistral (``model_type: mistral``): the Llama layout with sliding-window attention."""

from __future__ import annotations

from typing import Any

from jaxlm.config import ModelConfig
from jaxlm.io.hf.llama import (BARE, PREFIX, SKIP, check_decoder, decoder_config_from_hf, decoder_config_to_hf,  # noqa: F401
                               decoder_rules, windows_from_hf)

MODEL_TYPE = "mistral"
ARCHITECTURES = ("MistralForCausalLM",)


def config_from_hf(hf: dict[str, Any], arch: str) -> ModelConfig:
    return decoder_config_from_hf(hf, **windows_from_hf(hf, hf.get("sliding_window")))


def config_to_hf(c: ModelConfig) -> dict[str, Any]:
    check_decoder(c, "Mistral", norm_position="pre", has_qkv_bias=False, qk_norm=False, layer_types=(),
                  norm_unit_offset=False, embed_scale=False)
    return decoder_config_to_hf(c, MODEL_TYPE, ARCHITECTURES[0], sliding_window=c.sliding_window)


rules = decoder_rules
