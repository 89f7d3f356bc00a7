"""Qwen 2 / 2.5 (``model_type: qwen2``): the Llama layout with biases on q, k and v, and sliding
windows on the layers past ``max_window_layers`` when ``use_sliding_window`` is set."""

from __future__ import annotations

from typing import Any

from jaxlm.config import ModelConfig
from jaxlm.io.hf.llama import (BARE, PREFIX, SKIP, check_decoder, decoder_config_from_hf, decoder_config_to_hf,  # noqa: F401
                               decoder_rules, layer_types_to_hf, windows_from_hf)

MODEL_TYPE = "qwen2"
ARCHITECTURES = ("Qwen2ForCausalLM",)


def config_from_hf(hf: dict[str, Any], arch: str) -> ModelConfig:
    window = hf.get("sliding_window") if hf.get("use_sliding_window") else None
    if window is not None and not hf.get("layer_types"):  # hub configs: the layers from max_window_layers on
        first = hf.get("max_window_layers", hf["num_hidden_layers"])
        hf = {**hf, "layer_types": ["sliding_attention" if i >= first else "full_attention"
                                    for i in range(hf["num_hidden_layers"])]}
    return decoder_config_from_hf(hf, qkv_bias=True, **windows_from_hf(hf, window))


def config_to_hf(c: ModelConfig) -> dict[str, Any]:
    check_decoder(c, "Qwen2", norm_position="pre", has_qkv_bias=True, qk_norm=False, norm_unit_offset=False,
                  embed_scale=False)
    return decoder_config_to_hf(
        c, MODEL_TYPE, ARCHITECTURES[0], use_sliding_window=c.sliding_window is not None,
        sliding_window=c.sliding_window, max_window_layers=next(
            (i for i, w in enumerate(c.layer_windows) if w is not None), c.n_layers),
        layer_types=layer_types_to_hf(c))


rules = decoder_rules
