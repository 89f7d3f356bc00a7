"""GPT-2 (``model_type: gpt2``): config mapping both ways and the weight rules.

HF's GPT-2 stores Conv1D weights as [in, out] and fuses q, k, v into one ``c_attn`` matrix; the
attention-mask buffers (``attn.bias``, ``attn.masked_bias``) are not weights. A tied
``lm_head.weight`` (some files carry it) is the token embedding again.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from jaxlm.config import ModelConfig
from jaxlm.io.hf.common import ACT_TO_HF, Rule, activation_from_hf, d_ff_from_hf, linear, reshaped, same, tied

MODEL_TYPE = "gpt2"
ARCHITECTURES = ("GPT2LMHeadModel", "GPT2Model")
PREFIX = "transformer."  # GPT2LMHeadModel's body; GPT2Model's tensors have no prefix
BARE = ("GPT2Model",)
SKIP = re.compile(r"(^|\.)attn\.(bias|masked_bias)$")  # causal-mask buffers, not weights


def config_from_hf(hf: dict[str, Any], arch: str) -> ModelConfig:
    for flag, ok in (("scale_attn_by_inverse_layer_idx", False), ("reorder_and_upcast_attn", False),
                     ("add_cross_attention", False), ("scale_attn_weights", True)):
        if hf.get(flag, ok) != ok:
            raise ValueError(f"GPT-2 config option {flag}={hf[flag]!r} is not supported")
    d = hf.get("n_embd", 768)
    return ModelConfig(
        name=hf.get("_name_or_path") or "gpt2", arch="decoder",
        vocab_size=hf.get("vocab_size", 50257), max_len=hf.get("n_positions", 1024),
        d_model=d, n_layers=hf.get("n_layer", 12), n_heads=hf.get("n_head", 12),
        d_ff=d_ff_from_hf(hf.get("n_inner"), d),
        activation=activation_from_hf(hf.get("activation_function", "gelu_new")),
        norm="layernorm", norm_eps=hf.get("layer_norm_epsilon", 1e-5), norm_position="pre",
        positions="learned", tie_embeddings=hf.get("tie_word_embeddings", True), head="lm",
        dropout=hf.get("resid_pdrop", 0.1), attention_dropout=hf.get("attn_pdrop", 0.1),
        init_std=hf.get("initializer_range", 0.02), pad_token_id=hf.get("pad_token_id"),
        bos_token_id=hf.get("bos_token_id", 50256), eos_token_id=hf.get("eos_token_id", 50256),
    )


def config_to_hf(c: ModelConfig) -> dict[str, Any]:
    if (c.positions, c.norm, c.norm_position) != ("learned", "layernorm", "pre"):
        raise ValueError(f"model {c.name!r} has no GPT-2 equivalent in transformers")
    return {
        "model_type": MODEL_TYPE, "architectures": ["GPT2LMHeadModel"],
        "vocab_size": c.vocab_size, "n_positions": c.max_len, "n_embd": c.d_model,
        "n_layer": c.n_layers, "n_head": c.n_heads, "n_inner": c.mlp_dim,
        "activation_function": ACT_TO_HF[c.activation],
        "layer_norm_epsilon": c.norm_eps, "initializer_range": c.init_std,
        "resid_pdrop": c.dropout, "embd_pdrop": c.dropout,
        "attn_pdrop": c.attention_dropout, "tie_word_embeddings": c.tie_embeddings,
        "bos_token_id": c.bos_token_id, "eos_token_id": c.eos_token_id, "pad_token_id": c.pad_token_id,
    }


def rules(c: ModelConfig) -> list[Rule]:
    D, H, Dh, F, V, P = c.d_model, c.n_heads, c.dim_per_head, c.mlp_dim, c.vocab_size, c.max_len
    blk = "layers.blocks."

    def split_qkv(kind, param, shape, piece):  # c_attn holds q, k and v side by side along its last axis
        return Rule(f"h.{{}}.attn.c_attn.{kind}", shape,
                    tuple((f"{blk}attn.{n}.{param}", lambda w, j=j: piece(w[..., j * D:(j + 1) * D]))
                          for j, n in enumerate("qkv")),
                    lambda *qkv: np.concatenate([x.reshape(*shape[:-1], D) for x in qkv], axis=-1))

    return [
        same("wte.weight", (V, D), "embed.tokens.embedding"),
        same("wpe.weight", (P, D), "embed.positions.embedding"),
        same("h.{}.ln_1.weight", (D,), blk + "attn_norm.scale"),
        same("h.{}.ln_1.bias", (D,), blk + "attn_norm.bias"),
        split_qkv("weight", "kernel", (D, 3 * D), lambda w: w.reshape(D, H, Dh)),
        split_qkv("bias", "bias", (3 * D,), lambda b: b.reshape(H, Dh)),
        reshaped("h.{}.attn.c_proj.weight", (D, D), blk + "attn.o.kernel", (H, Dh, D)),
        same("h.{}.attn.c_proj.bias", (D,), blk + "attn.o.bias"),
        same("h.{}.ln_2.weight", (D,), blk + "mlp_norm.scale"),
        same("h.{}.ln_2.bias", (D,), blk + "mlp_norm.bias"),
        same("h.{}.mlp.c_fc.weight", (D, F), blk + "mlp.up.kernel"),
        same("h.{}.mlp.c_fc.bias", (F,), blk + "mlp.up.bias"),
        same("h.{}.mlp.c_proj.weight", (F, D), blk + "mlp.down.kernel"),
        same("h.{}.mlp.c_proj.bias", (D,), blk + "mlp.down.bias"),
        same("ln_f.weight", (D,), "final_norm.scale"),
        same("ln_f.bias", (D,), "final_norm.bias"),
        tied("lm_head.weight", (V, D)) if c.tie_embeddings else linear("lm_head.weight", (V, D), "lm_head.kernel", head=True),
    ]
