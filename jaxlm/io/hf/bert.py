"""BERT (``model_type: bert``): config mapping both ways and the weight rules.

HF's BERT stores Linear weights as [out, in]; old checkpoints name norm parameters gamma / beta.
The MLM decoder weight is tied to the word embeddings (absent from most files); the
next-sentence head (``cls.seq_relationship``) is not modelled.
"""

from __future__ import annotations

import re
from typing import Any

from jaxlm.config import ModelConfig
from jaxlm.io.hf.common import ACT_TO_HF, Rule, activation_from_hf, d_ff_from_hf, linear, reshaped, same, tied

MODEL_TYPE = "bert"
ARCHITECTURES = ("BertModel", "BertForMaskedLM", "BertForSequenceClassification")
PREFIX = "bert."  # the body of the task models; BertModel's tensors have no prefix
BARE = ("BertModel",)
SKIP = re.compile(r"^cls\.seq_relationship\.")  # the next-sentence head

_HEAD_OF = {"BertForMaskedLM": "mlm", "BertForSequenceClassification": "classify"}


def config_from_hf(hf: dict[str, Any], arch: str) -> ModelConfig:
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(
            f"BERT position_embedding_type={hf['position_embedding_type']!r} is not supported "
            "(only 'absolute')")
    if hf.get("is_decoder") or hf.get("add_cross_attention"):
        raise ValueError("BERT as a decoder (is_decoder / add_cross_attention) is not supported")
    head = _HEAD_OF.get(arch, "none")
    labels = hf.get("id2label") or {}
    names = tuple(str(labels.get(str(i), labels.get(i, ""))) for i in range(len(labels)))
    if all(n == f"LABEL_{i}" for i, n in enumerate(names)):  # transformers' placeholders: no names
        names = ()
    return ModelConfig(
        name=hf.get("_name_or_path") or "bert", arch="encoder",
        vocab_size=hf.get("vocab_size", 30522), max_len=hf.get("max_position_embeddings", 512),
        d_model=hf.get("hidden_size", 768), n_layers=hf.get("num_hidden_layers", 12),
        n_heads=hf.get("num_attention_heads", 12),
        d_ff=d_ff_from_hf(hf.get("intermediate_size", 3072), hf.get("hidden_size", 768)),
        activation=activation_from_hf(hf.get("hidden_act", "gelu")), norm="layernorm",
        norm_eps=hf.get("layer_norm_eps", 1e-12), norm_position="post", embed_norm=True,
        final_norm=False, positions="learned", type_vocab_size=hf.get("type_vocab_size", 2),
        tie_embeddings=hf.get("tie_word_embeddings", True), head=head,
        pooler=arch in ("BertModel", "BertForSequenceClassification"),
        num_labels=hf.get("num_labels") or len(labels) or 2,
        label_names=names if head == "classify" else (),
        dropout=hf.get("hidden_dropout_prob", 0.1),
        attention_dropout=hf.get("attention_probs_dropout_prob", 0.1),
        init_std=hf.get("initializer_range", 0.02), pad_token_id=hf.get("pad_token_id", 0),
    )


def config_to_hf(c: ModelConfig) -> dict[str, Any]:
    arch = {head: a for a, head in _HEAD_OF.items()}.get(c.head, "BertModel")
    out = {
        "model_type": MODEL_TYPE, "architectures": [arch],
        "vocab_size": c.vocab_size, "hidden_size": c.d_model,
        "num_hidden_layers": c.n_layers, "num_attention_heads": c.n_heads,
        "intermediate_size": c.mlp_dim, "hidden_act": ACT_TO_HF[c.activation],
        "max_position_embeddings": c.max_len, "type_vocab_size": c.type_vocab_size,
        "layer_norm_eps": c.norm_eps, "initializer_range": c.init_std,
        "hidden_dropout_prob": c.dropout, "attention_probs_dropout_prob": c.attention_dropout,
        "pad_token_id": c.pad_token_id, "tie_word_embeddings": c.tie_embeddings,
    }
    if c.head == "classify":
        names = c.label_names or tuple(f"LABEL_{i}" for i in range(c.num_labels))
        out["id2label"] = {str(i): n for i, n in enumerate(names)}
        out["label2id"] = {n: i for i, n in enumerate(names)}
    return out


def rules(c: ModelConfig) -> list[Rule]:
    D, H, Dh, F, V, P = c.d_model, c.n_heads, c.dim_per_head, c.mlp_dim, c.vocab_size, c.max_len
    L = "encoder.layer.{}."
    blk = "layers.blocks."

    def norm(hf, ours, **kw):  # old checkpoints say gamma / beta
        return [same(hf + ".weight", (D,), ours + ".scale", aliases=(hf + ".gamma",), **kw),
                same(hf + ".bias", (D,), ours + ".bias", aliases=(hf + ".beta",), **kw)]

    qkv = (("query", "q"), ("key", "k"), ("value", "v"))
    out = [
        same("embeddings.word_embeddings.weight", (V, D), "embed.tokens.embedding"),
        same("embeddings.position_embeddings.weight", (P, D), "embed.positions.embedding"),
        same("embeddings.token_type_embeddings.weight", (c.type_vocab_size, D), "embed.types.embedding"),
        *norm("embeddings.LayerNorm", "embed.norm"),
        *[linear(L + f"attention.self.{hf}.weight", (D, D), f"{blk}attn.{n}.kernel", (D, H, Dh)) for hf, n in qkv],
        *[reshaped(L + f"attention.self.{hf}.bias", (D,), f"{blk}attn.{n}.bias", (H, Dh)) for hf, n in qkv],
        linear(L + "attention.output.dense.weight", (D, D), blk + "attn.o.kernel", (H, Dh, D)),
        same(L + "attention.output.dense.bias", (D,), blk + "attn.o.bias"),
        *norm(L + "attention.output.LayerNorm", blk + "attn_norm"),
        linear(L + "intermediate.dense.weight", (F, D), blk + "mlp.up.kernel"),
        same(L + "intermediate.dense.bias", (F,), blk + "mlp.up.bias"),
        linear(L + "output.dense.weight", (D, F), blk + "mlp.down.kernel"),
        same(L + "output.dense.bias", (D,), blk + "mlp.down.bias"),
        *norm(L + "output.LayerNorm", blk + "mlp_norm"),
    ]
    if c.pooler:
        out += [linear("pooler.dense.weight", (D, D), "pooler.kernel"), same("pooler.dense.bias", (D,), "pooler.bias")]
    if c.head == "mlm":
        out += [
            linear("cls.predictions.transform.dense.weight", (D, D), "mlm.transform.kernel", head=True),
            same("cls.predictions.transform.dense.bias", (D,), "mlm.transform.bias", head=True),
            *norm("cls.predictions.transform.LayerNorm", "mlm.norm", head=True),
            # The decoder bias is the same tensor as cls.predictions.bias; either fills it.
            same("cls.predictions.bias", (V,), "mlm.bias", aliases=("cls.predictions.decoder.bias",), head=True),
            tied("cls.predictions.decoder.weight", (V, D)) if c.tie_embeddings else
            linear("cls.predictions.decoder.weight", (V, D), "mlm.decoder.kernel", head=True),
        ]
    if c.head == "classify":
        out += [linear("classifier.weight", (c.num_labels, D), "classifier.kernel", head=True),
                same("classifier.bias", (c.num_labels,), "classifier.bias", head=True)]
    return out
