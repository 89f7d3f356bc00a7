"""Qwen 3 (``model_type: qwen3``): the Llama layout with an RMSNorm over each head of q and k
(before RoPE); no q/k/v biases unless ``attention_bias``."""

from __future__ import annotations

from typing import Any

from jaxlm.config import ModelConfig
from jaxlm.io.hf.llama import (BARE, PREFIX, SKIP, check_decoder, decoder_config_from_hf, decoder_config_to_hf,  # noqa: F401
                               decoder_rules, layer_types_to_hf, windows_from_hf)

MODEL_TYPE = "qwen3"
ARCHITECTURES = ("Qwen3ForCausalLM",)


def config_from_hf(hf: dict[str, Any], arch: str) -> ModelConfig:
    if hf.get("attention_bias"):
        raise ValueError("Qwen3 with attention_bias is not supported")
    window = hf.get("sliding_window") if hf.get("use_sliding_window") else None
    return decoder_config_from_hf(hf, qk_norm=True, **windows_from_hf(hf, window))


def config_to_hf(c: ModelConfig) -> dict[str, Any]:
    check_decoder(c, "Qwen3", norm_position="pre", has_qkv_bias=False, qk_norm=True, norm_unit_offset=False,
                  embed_scale=False)
    return decoder_config_to_hf(
        c, MODEL_TYPE, ARCHITECTURES[0], attention_bias=False, use_sliding_window=c.sliding_window is not None,
        sliding_window=c.sliding_window,
        layer_types=layer_types_to_hf(c))


rules = decoder_rules
