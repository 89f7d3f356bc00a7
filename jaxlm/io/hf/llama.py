"""Llama 2 / 3 / 3.1+ (``model_type: llama``), and the decoder layout that Mistral, Qwen 2 / 3 and
Gemma 1 / 2 share with it: config mapping both ways and weight rules.

HF stores every projection as a torch Linear weight [out, in]: q_proj [H*Dh, D], k_proj / v_proj
[K*Dh, D], o_proj [D, H*Dh], gate_proj / up_proj [F, D], down_proj [D, F]. RoPE uses the half-split
rotation, as jaxlm does, so q and k need no permutation. A tied ``lm_head.weight`` is absent.
"""

from __future__ import annotations

import re
from typing import Any

from jaxlm.config import ModelConfig
from jaxlm.io.hf.common import ACT_TO_HF, Rule, activation_from_hf, linear, reshaped, same, tied

MODEL_TYPE = "llama"
ARCHITECTURES = ("LlamaForCausalLM",)
PREFIX = "model."  # the body; lm_head.weight has none
BARE = ()
SKIP = re.compile(r"(^|\.)rotary_emb\.inv_freq$")  # a buffer in older checkpoints

_LAYER_TYPES = {"full_attention": "full", "sliding_attention": "sliding"}


def rope_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    """ModelConfig rope fields from ``rope_parameters`` (transformers 5) or ``rope_theta`` +
    ``rope_scaling`` (hub configs)."""
    scaling = {**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}
    kind = scaling.get("rope_type") or scaling.get("type") or "default"
    theta = float(scaling.get("rope_theta", hf.get("rope_theta", 10000.0)))
    if scaling.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ValueError("partial rotary embeddings (partial_rotary_factor < 1) are not supported")
    if kind == "default":
        return dict(rope_theta=theta)
    if kind == "linear":
        return dict(rope_theta=theta, rope_scaling="linear", rope_factor=float(scaling["factor"]))
    if kind == "llama3":
        return dict(rope_theta=theta, rope_scaling="llama3", rope_factor=float(scaling["factor"]),
                    rope_low_freq_factor=float(scaling["low_freq_factor"]),
                    rope_high_freq_factor=float(scaling["high_freq_factor"]),
                    rope_original_max_len=int(scaling["original_max_position_embeddings"]))
    raise ValueError(f"RoPE scaling {kind!r} is not supported; supported: default, linear, llama3")


def rope_to_hf(c: ModelConfig) -> dict[str, Any]:
    params: dict[str, Any] = {"rope_type": "default" if c.rope_scaling == "none" else c.rope_scaling,
                              "rope_theta": c.rope_theta}
    if c.rope_scaling != "none":
        params["factor"] = c.rope_factor
    if c.rope_scaling == "llama3":
        params.update(low_freq_factor=c.rope_low_freq_factor, high_freq_factor=c.rope_high_freq_factor,
                      original_max_position_embeddings=c.rope_original_max_len)
    # Both spellings: transformers 5 reads rope_parameters, earlier versions rope_theta + rope_scaling.
    return {"rope_parameters": params, "rope_theta": c.rope_theta,
            "rope_scaling": None if c.rope_scaling == "none" else dict(params)}


def windows_from_hf(hf: dict[str, Any], window) -> dict[str, Any]:
    """sliding_window / layer_types from HF's (``layer_types`` of "full_attention" /
    "sliding_attention"; without it, every layer slides when a window is set)."""
    types = tuple(_LAYER_TYPES.get(t, t) for t in hf.get("layer_types") or ())
    if window is None or (types and "sliding" not in types):
        return dict(sliding_window=None, layer_types=())
    return dict(sliding_window=int(window), layer_types=() if set(types) <= {"sliding"} else types)


def layer_types_to_hf(c: ModelConfig) -> list[str]:
    """HF's ``layer_types`` for a config: "sliding_attention" / "full_attention" per layer."""
    return ["sliding_attention" if w else "full_attention" for w in c.layer_windows]


def _first(value):
    """An id, or the first of a list of them (Llama 3's several EOS ids; generation stops at the first)."""
    return value[0] if isinstance(value, (list, tuple)) else value


def decoder_config_from_hf(hf: dict[str, Any], **family) -> ModelConfig:
    """The fields every Llama-style family shares; ``family`` sets the rest."""
    d, h = hf["hidden_size"], hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or d // h
    kv = hf.get("num_key_value_heads") or h
    act = hf.get("hidden_activation") or hf.get("hidden_act", "silu")
    fields = dict(
        name=hf.get("_name_or_path") or hf["model_type"], arch="decoder", vocab_size=hf["vocab_size"],
        max_len=hf.get("max_position_embeddings", 2048), d_model=d, n_layers=hf["num_hidden_layers"],
        n_heads=h, n_kv_heads=None if kv == h else kv,
        head_dim=None if d % h == 0 and head_dim == d // h else head_dim,
        d_ff=hf["intermediate_size"], activation=activation_from_hf(act), norm="rmsnorm",
        norm_eps=hf.get("rms_norm_eps", 1e-6), norm_position="pre", final_norm=True, positions="rope",
        **rope_from_hf(hf), use_bias=False, gated_mlp=True, tie_embeddings=hf.get("tie_word_embeddings", False),
        head="lm", dropout=0.0, attention_dropout=hf.get("attention_dropout", 0.0),
        init_std=hf.get("initializer_range", 0.02), pad_token_id=_first(hf.get("pad_token_id")),
        bos_token_id=_first(hf.get("bos_token_id")), eos_token_id=_first(hf.get("eos_token_id")))
    return ModelConfig(**{**fields, **family})


def decoder_config_to_hf(c: ModelConfig, model_type: str, architecture: str, **extra) -> dict[str, Any]:
    out = {
        "model_type": model_type, "architectures": [architecture], "vocab_size": c.vocab_size,
        "max_position_embeddings": c.max_len, "hidden_size": c.d_model, "num_hidden_layers": c.n_layers,
        "num_attention_heads": c.n_heads, "num_key_value_heads": c.kv_heads, "head_dim": c.dim_per_head,
        "intermediate_size": c.mlp_dim, "hidden_act": ACT_TO_HF[c.activation], "rms_norm_eps": c.norm_eps,
        **rope_to_hf(c), "tie_word_embeddings": c.tie_embeddings, "attention_dropout": c.attention_dropout,
        "initializer_range": c.init_std, "pad_token_id": c.pad_token_id, "bos_token_id": c.bos_token_id,
        "eos_token_id": c.eos_token_id,
    }
    return {**out, **extra}


def check_decoder(c: ModelConfig, family: str, **expected) -> None:
    """Refuse a config this family's HF model cannot express (e.g. a GPT-2 shape as a Llama)."""
    want = dict(arch="decoder", positions="rope", norm="rmsnorm", gated_mlp=True, use_bias=False,
                head="lm", **expected)
    for field, value in want.items():
        if getattr(c, field) != value:
            raise ValueError(f"model {c.name!r} has no {family} equivalent in transformers "
                             f"({field}={getattr(c, field)!r}, {family} needs {value!r})")


def config_from_hf(hf: dict[str, Any], arch: str) -> ModelConfig:
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise ValueError("Llama with attention_bias or mlp_bias is not supported")
    return decoder_config_from_hf(hf)


def config_to_hf(c: ModelConfig) -> dict[str, Any]:
    check_decoder(c, "Llama", norm_position="pre", has_qkv_bias=False, qk_norm=False, sliding_window=None,
                  norm_unit_offset=False, embed_scale=False)
    return decoder_config_to_hf(c, MODEL_TYPE, ARCHITECTURES[0], attention_bias=False, mlp_bias=False)


def decoder_rules(c: ModelConfig) -> list[Rule]:
    """The weight rules of the shared layout, read off the config: q/k/v biases, q/k norms and
    Gemma 2's sandwich norms where the config has them."""
    D, H, K, Dh, F, V = c.d_model, c.n_heads, c.kv_heads, c.dim_per_head, c.mlp_dim, c.vocab_size
    L = "layers.{}."
    blk = "layers.blocks."
    sandwich = c.norm_position == "sandwich"
    rules = [
        same("embed_tokens.weight", (V, D), "embed.tokens.embedding"),
        same(L + "input_layernorm.weight", (D,), blk + "attn_norm.scale"),
        linear(L + "self_attn.q_proj.weight", (H * Dh, D), blk + "attn.q.kernel", (D, H, Dh)),
        linear(L + "self_attn.k_proj.weight", (K * Dh, D), blk + "attn.k.kernel", (D, K, Dh)),
        linear(L + "self_attn.v_proj.weight", (K * Dh, D), blk + "attn.v.kernel", (D, K, Dh)),
        linear(L + "self_attn.o_proj.weight", (D, H * Dh), blk + "attn.o.kernel", (H, Dh, D)),
        # Llama's "post_attention_layernorm" is the norm before the MLP; Gemma 2's is a true post-norm.
        same(L + "post_attention_layernorm.weight", (D,), blk + ("attn_post_norm" if sandwich else "mlp_norm") + ".scale"),
        linear(L + "mlp.gate_proj.weight", (F, D), blk + "mlp.gate.kernel"),
        linear(L + "mlp.up_proj.weight", (F, D), blk + "mlp.up.kernel"),
        linear(L + "mlp.down_proj.weight", (D, F), blk + "mlp.down.kernel"),
        same("norm.weight", (D,), "final_norm.scale"),
        tied("lm_head.weight", (V, D)) if c.tie_embeddings else linear("lm_head.weight", (V, D), "lm_head.kernel", head=True),
    ]
    if c.has_qkv_bias:
        rules += [reshaped(L + f"self_attn.{n}_proj.bias", (heads * Dh,), blk + f"attn.{n}.bias", (heads, Dh))
                  for n, heads in (("q", H), ("k", K), ("v", K))]
    if c.qk_norm:
        rules += [same(L + f"self_attn.{n}_norm.weight", (Dh,), blk + f"attn.{n}_norm.scale") for n in "qk"]
    if sandwich:
        rules += [same(L + "pre_feedforward_layernorm.weight", (D,), blk + "mlp_norm.scale"),
                  same(L + "post_feedforward_layernorm.weight", (D,), blk + "mlp_post_norm.scale")]
    return rules


rules = decoder_rules
