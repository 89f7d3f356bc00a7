"""Frozen configuration dataclasses and named presets.

A family's differences live in fields (``norm``, ``positions``, ``norm_position``, ...), never in
model-name branches inside the layers. Derived values are properties.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
from pathlib import Path
from typing import Any

import yaml

BLOCK_KERNELS = ("q", "k", "v", "o", "up", "down", "gate")  # gate: gated MLPs only

_CHOICES = {
    "arch": ("decoder", "encoder"),
    "activation": ("gelu_tanh", "gelu", "relu", "silu"),
    "norm": ("layernorm", "rmsnorm"),
    "norm_position": ("pre", "post", "sandwich"),
    "positions": ("learned", "sinusoidal", "rope", "none"),
    "head": ("lm", "mlm", "classify", "none"),
    "dtype": ("float32", "bfloat16", "float16"),
    "attention_impl": ("xla", "cudnn", "einsum"),
    "quantize": ("none", "int8"),
    "rope_scaling": ("none", "linear", "llama3"),
}
LAYER_TYPES = ("full", "sliding")


def closest(name: str, allowed) -> str:
    """' (did you mean X?)' when a close match exists, else ''."""
    match = difflib.get_close_matches(name, list(allowed), n=1)
    return f" (did you mean {match[0]!r}?)" if match else ""


# What each ModelConfig field means, declared once (in the field's metadata); every check that
# compares configs derives its field list from these kinds:
#   shape     which parameters exist and their shapes (a checkpoint fits only the same values)
#   function  what the model computes from the same parameters (activation, norm details, RoPE base)
#   adapter   adaptation / compression: adapters, factors, int8 kernels, a soft prompt
#   tokens    special token ids and class names: how text maps onto the model, not its weights
#   training  active only while training (dropout); a fine-tuning run sets them for itself
#   init      how fresh parameters are drawn
#   runtime   how the model is computed, never what (beyond floating-point rounding of dtype)
#   name      a label
# ``layout=True`` marks the runtime field that also decides how parameters are stored in training
# checkpoints (stacked or per layer), so a resumed run must keep it.
FIELD_KINDS = ("shape", "function", "adapter", "tokens", "training", "init", "runtime", "name")


def _field(default, kind: str, *, layout: bool = False):
    return dataclasses.field(default=default, metadata={"kind": kind, "layout": layout})


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and behaviour of one Transformer language model. Each field declares its kind
    (``FIELD_KINDS``); ``fields_of(kind, ...)`` lists the fields of some kinds."""

    name: str = _field("custom", "name")
    arch: str = _field("decoder", "shape")  # decoder: causal (GPT); encoder: bidirectional (BERT)
    vocab_size: int = _field(50257, "shape")
    max_len: int = _field(1024, "shape")  # context length (number of learned positions)
    d_model: int = _field(768, "shape")
    n_layers: int = _field(12, "shape")
    n_heads: int = _field(12, "shape")
    n_kv_heads: int | None = _field(None, "shape")  # grouped-query attention; None = n_heads
    head_dim: int | None = _field(None, "shape")  # None = d_model // n_heads
    d_ff: int | None = _field(None, "shape")  # None = 4 * d_model
    activation: str = _field("gelu_tanh", "function")
    norm: str = _field("layernorm", "shape")  # rmsnorm has no bias
    norm_eps: float = _field(1e-5, "function")
    # pre: x + f(norm(x)) (GPT-2, Llama); post: norm(x + f(x)) (BERT); sandwich: x + norm(f(norm(x))) (Gemma 2)
    norm_position: str = _field("pre", "shape")
    norm_unit_offset: bool = _field(False, "function")  # RMSNorm scale is 1 + weight, weights start at 0 (Gemma)
    embed_norm: bool = _field(False, "shape")  # normalise the summed embeddings (BERT)
    embed_scale: bool = _field(False, "function")  # token embeddings times sqrt(d_model) (Gemma)
    final_norm: bool = _field(True, "shape")  # norm after the last block (pre-LN models)
    positions: str = _field("learned", "shape")
    rope_theta: float = _field(10000.0, "function")
    rope_scaling: str = _field("none", "function")  # linear: positions / factor; llama3: Llama 3.1's bands
    rope_factor: float = _field(1.0, "function")
    rope_low_freq_factor: float = _field(1.0, "function")  # llama3 only
    rope_high_freq_factor: float = _field(4.0, "function")  # llama3 only
    rope_original_max_len: int = _field(8192, "function")  # llama3 only: the pre-training context
    sliding_window: int | None = _field(None, "function")  # a query sees the last N keys (itself included)
    layer_types: tuple[str, ...] = _field((), "function")  # per layer "full" / "sliding"; () = all alike
    attn_softcap: float | None = _field(None, "function")  # scores -> cap * tanh(scores / cap) (Gemma 2)
    final_softcap: float | None = _field(None, "function")  # logits -> cap * tanh(logits / cap) (Gemma 2)
    query_pre_attn_scalar: float | None = _field(None, "function")  # scores scaled by this ** -0.5; None: head_dim
    type_vocab_size: int = _field(0, "shape")  # token-type (segment) embeddings; 0 = none
    use_bias: bool = _field(True, "shape")
    qkv_bias: bool | None = _field(None, "shape")  # biases on q, k, v only (Qwen 2); None = use_bias
    qk_norm: bool = _field(False, "shape")  # RMSNorm over each head of q and k (Qwen 3)
    gated_mlp: bool = _field(False, "shape")  # down(act(gate(x)) * up(x)): SwiGLU / GeGLU
    tie_embeddings: bool = _field(True, "shape")  # LM / MLM decoder shares the token embedding matrix
    head: str = _field("lm", "shape")
    pooler: bool = _field(False, "shape")  # dense + tanh on the first token (BERT)
    num_labels: int = _field(2, "shape")
    label_names: tuple[str, ...] = _field((), "tokens")  # head="classify": the class of each output, if known
    dropout: float = _field(0.1, "training")
    attention_dropout: float = _field(0.1, "training")
    init_std: float = _field(0.02, "init")
    pad_token_id: int | None = _field(None, "tokens")
    bos_token_id: int | None = _field(None, "tokens")
    eos_token_id: int | None = _field(None, "tokens")
    # Adaptation and compression (each changes which parameters exist; see jaxlm/compress/).
    # Targets name the kernels of every block: q, k, v, o (attention), up, down (MLP).
    lora_rank: int = _field(0, "adapter")  # LoRA adapters of this rank beside the lora_targets kernels; 0 = none
    lora_alpha: float = _field(16.0, "adapter")  # the adapters' output is scaled by lora_alpha / lora_rank
    lora_targets: tuple[str, ...] = _field(("q", "v"), "adapter")
    factor_rank: int = _field(0, "adapter")  # factor_targets kernels stored as two rank-r factors; 0 = full
    factor_targets: tuple[str, ...] = _field((), "adapter")
    quantize: str = _field("none", "adapter")  # int8: weight-only int8 kernels and embeddings, per-channel scales
    prompt_length: int = _field(0, "adapter")  # trainable soft-prompt vectors before every input; 0 = none
    # How to compute (results unchanged):
    dtype: str = _field("float32", "runtime")
    scan_layers: bool = _field(True, "runtime", layout=True)
    remat: bool = _field(False, "runtime")
    attention_impl: str = _field("xla", "runtime")

    def __post_init__(self):
        for field in ("lora_targets", "factor_targets", "label_names", "layer_types"):  # lists or "q,v" strings
            value = getattr(self, field)
            names = value.split(",") if isinstance(value, str) else value
            object.__setattr__(self, field, tuple(n.strip() for n in names if n.strip()))
        for field, allowed in _CHOICES.items():
            value = getattr(self, field)
            if value not in allowed:
                raise ValueError(
                    f"ModelConfig.{field}={value!r} is not one of {', '.join(allowed)}"
                    + closest(str(value), allowed)
                )
        for field in ("vocab_size", "max_len", "d_model", "n_layers", "n_heads", "num_labels"):
            if getattr(self, field) < 1:
                raise ValueError(f"ModelConfig.{field}={getattr(self, field)} must be >= 1")
        if self.head_dim is None and self.d_model % self.n_heads:
            raise ValueError(
                f"ModelConfig.d_model={self.d_model} is not divisible by n_heads={self.n_heads}"
            )
        if self.n_heads % self.kv_heads:
            raise ValueError(
                f"ModelConfig.n_heads={self.n_heads} is not a multiple of n_kv_heads={self.kv_heads}"
            )
        if self.positions == "rope" and self.dim_per_head % 2:
            raise ValueError(f"rotary positions need an even head_dim, got {self.dim_per_head}")
        if self.rope_scaling != "none" and not self.rope_factor > 0:
            raise ValueError(f"ModelConfig.rope_factor={self.rope_factor} must be > 0")
        if self.layer_types:
            if len(self.layer_types) != self.n_layers:
                raise ValueError(f"{len(self.layer_types)} layer_types for n_layers={self.n_layers}")
            bad = [t for t in self.layer_types if t not in LAYER_TYPES]
            if bad:
                raise ValueError(f"layer type {bad[0]!r} is not one of {', '.join(LAYER_TYPES)}" + closest(bad[0], LAYER_TYPES))
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"ModelConfig.sliding_window={self.sliding_window} must be >= 1 (or None)")
        if "sliding" in self.layer_types and self.sliding_window is None:
            raise ValueError("sliding layer_types need a sliding_window")
        if self.sliding_window is not None and not self.causal:
            raise ValueError("sliding_window is for decoders (causal attention)")
        if not 0 <= self.prompt_length < self.max_len:
            raise ValueError(f"ModelConfig.prompt_length={self.prompt_length} must be in [0, max_len={self.max_len})")
        if self.label_names and len(self.label_names) != self.num_labels:
            raise ValueError(f"{len(self.label_names)} label_names for num_labels={self.num_labels}")
        for kind, rank, targets in (("lora", self.lora_rank, self.lora_targets),
                                    ("factor", self.factor_rank, self.factor_targets)):
            if rank < 0:
                raise ValueError(f"ModelConfig.{kind}_rank={rank} must be >= 0")
            for name in targets if rank else ():
                if name not in self.block_kernels:
                    raise ValueError(f"{kind} target {name!r} matches no kernel; the kernels of a block are "
                                     f"{', '.join(self.block_kernels)}" + closest(name, self.block_kernels))
                fan_in, fan_out = self.kernel_dims(name)
                if rank > min(fan_in, fan_out):
                    raise ValueError(f"{kind} rank {rank} is larger than kernel {name!r} allows: it is "
                                     f"{fan_in} x {fan_out}, so the rank is at most {min(fan_in, fan_out)}")
        if self.factor_rank and self.lora_rank and set(self.factor_targets) & set(self.lora_targets):
            raise ValueError("a kernel cannot be both factored and LoRA-adapted; fine-tune first, then factor")

    # Derived values -------------------------------------------------------------------------
    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    @property
    def mlp_dim(self) -> int:
        return self.d_ff or 4 * self.d_model

    @property
    def context(self) -> int:
        """Tokens of text a sequence may hold: max_len less the soft prompt's positions."""
        return self.max_len - self.prompt_length

    @property
    def causal(self) -> bool:
        return self.arch == "decoder"

    @property
    def block_kernels(self) -> tuple[str, ...]:
        """The kernels of one block: q, k, v, o, up, down (and gate in a gated MLP)."""
        return BLOCK_KERNELS if self.gated_mlp else BLOCK_KERNELS[:-1]

    @property
    def layer_windows(self) -> tuple[int | None, ...]:
        """Each layer's sliding window (None: it sees every earlier key)."""
        types = self.layer_types or ("sliding" if self.sliding_window else "full",) * self.n_layers
        return tuple(self.sliding_window if t == "sliding" else None for t in types)

    @property
    def has_qkv_bias(self) -> bool:
        return self.use_bias if self.qkv_bias is None else self.qkv_bias

    def kernel_dims(self, name: str) -> tuple[int, int]:
        """(fan-in, fan-out) of a block kernel: q, k, v, o, up, down or gate."""
        d, hd, kd = self.d_model, self.n_heads * self.dim_per_head, self.kv_heads * self.dim_per_head
        return {"q": (d, hd), "k": (d, kd), "v": (d, kd), "o": (hd, d), "up": (d, self.mlp_dim),
                "down": (self.mlp_dim, d), "gate": (d, self.mlp_dim)}[name]

    # Presets --------------------------------------------------------------------------------
    @classmethod
    def preset(cls, preset_name: str, /, **overrides) -> "ModelConfig":
        """A named preset (see ``PRESETS``), with field overrides."""
        if preset_name not in PRESETS:
            raise ValueError(f"unknown model preset {preset_name!r}; available: {', '.join(PRESETS)}"
                             + closest(preset_name, PRESETS))
        return cls(**{**PRESETS[preset_name], "name": preset_name, **overrides})

    @classmethod
    def gpt2(cls, size: str = "", **overrides) -> "ModelConfig":
        return cls.preset("gpt2" + (f"-{size}" if size else ""), **overrides)

    @classmethod
    def bert_base(cls, **overrides) -> "ModelConfig":
        return cls.preset("bert-base-uncased", **overrides)

    # Serialisation --------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = [k for k in d if k not in names]
        if unknown:
            raise ValueError(
                f"unknown ModelConfig field {unknown[0]!r}" + closest(unknown[0], names)
            )
        return cls(**d)

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def first_difference(self, other: "ModelConfig", fields) -> str | None:
        """The first of ``fields`` whose value differs between the two configs, or None."""
        return next((f for f in fields if getattr(self, f) != getattr(other, f)), None)


def fields_of(*kinds: str) -> tuple[str, ...]:
    """The ModelConfig fields of the given kinds (see ``FIELD_KINDS``), in declaration order."""
    unknown = set(kinds) - set(FIELD_KINDS)
    if unknown:
        raise ValueError(f"unknown field kind {sorted(unknown)[0]!r}; kinds: {', '.join(FIELD_KINDS)}")
    return tuple(f.name for f in dataclasses.fields(ModelConfig) if f.metadata["kind"] in kinds)


# Fields that may differ between a saved model and the one computed from it (jaxlm.load overrides).
RUNTIME_FIELDS = fields_of("runtime")
# Fields a resumed run must share with its checkpoints: the parameters, and how they are stored.
CHECKPOINT_FIELDS = fields_of("shape", "adapter") + tuple(
    f.name for f in dataclasses.fields(ModelConfig) if f.metadata["layout"])


_GPT2 = dict(arch="decoder", vocab_size=50257, max_len=1024, activation="gelu_tanh",
             norm_eps=1e-5, bos_token_id=50256, eos_token_id=50256)
_BERT = dict(arch="encoder", vocab_size=30522, max_len=512, activation="gelu", norm_eps=1e-12,
             norm_position="post", embed_norm=True, final_norm=False, type_vocab_size=2,
             head="mlm", pad_token_id=0)

PRESETS: dict[str, dict[str, Any]] = {
    "gpt2": dict(_GPT2, d_model=768, n_layers=12, n_heads=12),
    "gpt2-medium": dict(_GPT2, d_model=1024, n_layers=24, n_heads=16),
    "gpt2-large": dict(_GPT2, d_model=1280, n_layers=36, n_heads=20),
    "gpt2-xl": dict(_GPT2, d_model=1600, n_layers=48, n_heads=25),
    "gpt2-tiny": dict(_GPT2, d_model=64, n_layers=2, n_heads=4, max_len=128),
    "bert-base-uncased": dict(_BERT, d_model=768, n_layers=12, n_heads=12),
    "bert-large-uncased": dict(_BERT, d_model=1024, n_layers=24, n_heads=16),
    "bert-tiny": dict(_BERT, d_model=64, n_layers=2, n_heads=4, max_len=128),
}

# The Llama-layout families: RMSNorm, rotary positions, a gated MLP, no biases, no dropout.
_LLAMA = dict(arch="decoder", activation="silu", norm="rmsnorm", positions="rope", use_bias=False, gated_mlp=True,
              tie_embeddings=False, dropout=0.0, attention_dropout=0.0)
_GEMMA = dict(_LLAMA, activation="gelu_tanh", norm_unit_offset=True, embed_scale=True, tie_embeddings=True,
              norm_eps=1e-6, pad_token_id=0, bos_token_id=2, eos_token_id=1)
_TINY = dict(vocab_size=512, max_len=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128)


def _gemma2(n_layers: int, **fields) -> dict[str, Any]:
    return dict(_GEMMA, norm_position="sandwich", layer_types=("sliding", "full") * (n_layers // 2),
                attn_softcap=50.0, final_softcap=30.0, n_layers=n_layers, **fields)


PRESETS.update({
    "llama-tiny": dict(_LLAMA, **_TINY, norm_eps=1e-5),
    "llama3.2-1b": dict(_LLAMA, vocab_size=128256, max_len=131072, d_model=2048, n_layers=16, n_heads=32,
                        n_kv_heads=8, d_ff=8192, norm_eps=1e-5, rope_theta=500000.0, rope_scaling="llama3",
                        rope_factor=32.0, tie_embeddings=True, bos_token_id=128000, eos_token_id=128001),
    "llama3-8b": dict(_LLAMA, vocab_size=128256, max_len=8192, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                      d_ff=14336, norm_eps=1e-5, rope_theta=500000.0, bos_token_id=128000, eos_token_id=128001),
    "mistral-tiny": dict(_LLAMA, **_TINY, norm_eps=1e-5, sliding_window=16),
    "mistral-7b": dict(_LLAMA, vocab_size=32000, max_len=32768, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                       d_ff=14336, norm_eps=1e-5, sliding_window=4096, bos_token_id=1, eos_token_id=2),
    "qwen2-tiny": dict(_LLAMA, **_TINY, norm_eps=1e-6, qkv_bias=True),
    "qwen2.5-0.5b": dict(_LLAMA, vocab_size=151936, max_len=32768, d_model=896, n_layers=24, n_heads=14, n_kv_heads=2,
                         d_ff=4864, norm_eps=1e-6, rope_theta=1000000.0, qkv_bias=True, tie_embeddings=True,
                         bos_token_id=151643, eos_token_id=151643),
    "qwen3-tiny": dict(_LLAMA, **_TINY, head_dim=32, norm_eps=1e-6, qk_norm=True),
    "qwen3-0.6b": dict(_LLAMA, vocab_size=151936, max_len=40960, d_model=1024, n_layers=28, n_heads=16, n_kv_heads=8,
                       head_dim=128, d_ff=3072, norm_eps=1e-6, rope_theta=1000000.0, qk_norm=True,
                       tie_embeddings=True, bos_token_id=151643, eos_token_id=151645),
    "gemma-tiny": dict(_GEMMA, **{**_TINY, "n_kv_heads": 1}, head_dim=32),
    "gemma-2b": dict(_GEMMA, vocab_size=256000, max_len=8192, d_model=2048, n_layers=18, n_heads=8, n_kv_heads=1,
                     d_ff=16384),
    "gemma2-tiny": _gemma2(2, **{k: v for k, v in _TINY.items() if k != "n_layers"}, head_dim=32, sliding_window=16,
                           query_pre_attn_scalar=24.0),
    "gemma2-2b": _gemma2(26, vocab_size=256000, max_len=8192, d_model=2304, n_heads=8, n_kv_heads=4, head_dim=256,
                         d_ff=9216, sliding_window=4096, query_pre_attn_scalar=256.0),
})


# Training configuration -------------------------------------------------------------------------

_TRAIN_CHOICES = {
    ("data", "unit"): ("file", "line"),
    ("data", "packing"): ("", "eos", "segments", "pad"),
    ("optim", "name"): ("adamw", "sgd", "adafactor"),
    ("train", "dtype"): ("float32", "bfloat16"),
    ("adapt", "method"): ("full", "lora", "prompt"),
    ("prune", "scope"): ("global", "layer"),
}


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where text comes from and how it becomes batches. No path and no tfds_name: the default
    corpus (the Python standard library's .py files)."""

    path: str | None = None  # files, directories or globs, comma-separated
    tfds_name: str | None = None  # a prepared tensorflow-datasets catalog dataset, e.g. "lm1b"
    # Weighted sources instead of path / tfds_name: "SRC:W,SRC:W", SRC a path, directory or glob, or
    # tfds:NAME; rows are drawn in proportion to the weights (grain's mix), deterministically.
    mixture: str = ""
    text_key: str = "text"
    label_key: str = "label"  # train.objective=classify: the label column / key / feature
    unit: str = "file"  # one example per file or per line (local text)
    val_fraction: float = 0.05
    tokenizer: str = "byte"  # "byte" or a model dir holding tokenizer files
    seq_len: int = 256
    batch_size: int = 16  # global, across hosts and micro-batches
    data_dir: str | None = None  # tfds data dir and token cache (default ~/.cache/jaxlm)
    # How examples share rows: eos (documents joined with EOS, attention across them: clm / mlm
    # pre-training), segments (packed, each example attends only to itself, positions restart:
    # clm / mlm / sft), pad (one example per row: sft / dpo). "": eos for clm / mlm, segments for
    # sft, pad for dpo.
    packing: str = ""
    chat_template: str = ""  # sft / dpo on chat messages: a Jinja template file ("": the tokenizer's own)


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    name: str = "adamw"
    lr: float = 1e-3
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # cosine decay ends at lr * min_lr_ratio
    weight_decay: float = 0.1  # not applied to norms, biases or embeddings
    b1: float = 0.9
    b2: float = 0.95
    clip_norm: float = 1.0
    grad_accum: int = 1  # micro-batches per step (data.batch_size is split among them)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    objective: str = "clm"  # a name in jaxlm.objectives' registry (checked when a run is set up)
    steps: int = 1000
    eval_every: int = 100
    eval_batches: int = 8
    save_every: int = 500
    keep: int = 3
    log_every: int = 10
    seed: int = 0
    workdir: str = "runs/quickstart"
    dtype: str = "float32"  # compute dtype; parameters stay float32
    mlm_prob: float = 0.15


@dataclasses.dataclass(frozen=True)
class AdaptConfig:
    """Fine-tuning from a pretrained model: which weights start from it and which are trained."""

    init: str = ""  # start from this model (jaxlm model dir, training workdir, HF dir); "" = scratch
    method: str = "full"  # full: all weights train; lora: only low-rank adapters; prompt: only a soft prompt
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: str = "q,v"  # comma-separated block kernels: q, k, v, o, up, down
    prompt_length: int = 20  # method=prompt: soft-prompt vectors (the only trained weights)


@dataclasses.dataclass(frozen=True)
class PruneConfig:
    """Magnitude pruning during training: masked block-kernel weights stay exactly zero."""

    sparsity: float = 0.0  # final fraction of block-kernel weights set to zero; 0 = no pruning
    scope: str = "global"  # global: one threshold over all kernels; layer: per kernel and layer
    start: int = 0  # the step after which pruning begins
    end: int = 0  # the step at which sparsity is reached (cubic schedule); <= start: all at once
    every: int = 10  # steps between mask updates on the way


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    """train.objective=distill: learn from a teacher model's outputs (see jaxlm/compress/distill.py)."""

    teacher: str = ""  # any model jaxlm.load accepts, with the student's vocabulary
    temperature: float = 2.0
    alpha: float = 0.5  # weight of the soft-target (KL) loss; 1 - alpha goes to the true tokens
    attention_weight: float = 0.0  # weight of the attention-map MSE; 0 = off
    layer_map: str = ""  # "s:t,..." student -> teacher layers for attention maps; "" = evenly spaced


@dataclasses.dataclass(frozen=True)
class DPOConfig:
    """train.objective=dpo: preference tuning against a frozen reference model."""

    beta: float = 0.1  # strength of the implicit KL constraint to the reference
    reference: str = ""  # any model jaxlm.load accepts; "": the starting model (adapters off under LoRA)
    sft_weight: float = 0.0  # + this times the chosen responses' mean token NLL (RPO); 0 = plain DPO


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    data: int = -1  # -1: all remaining devices
    fsdp: int = 1
    tensor: int = 1


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything a training run needs; built from YAML plus ``a.b=value`` overrides."""

    model: ModelConfig = dataclasses.field(default_factory=lambda: ModelConfig.preset("gpt2-tiny"))
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    adapt: AdaptConfig = dataclasses.field(default_factory=AdaptConfig)
    prune: PruneConfig = dataclasses.field(default_factory=PruneConfig)
    distill: DistillConfig = dataclasses.field(default_factory=DistillConfig)
    dpo: DPOConfig = dataclasses.field(default_factory=DPOConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def with_absolute_paths(self) -> "Config":
        """This config with every local path it refers to made absolute (data files, the token
        cache, the tokenizer, adapt.init, distill.teacher), so that a run's saved config finds
        them from any directory. Hub ids and paths that do not exist stay as given."""
        data = dataclasses.replace(
            self.data,
            path=self.data.path and ",".join(_absolute(p, pattern=True) for p in self.data.path.split(",")),
            data_dir=self.data.data_dir and _absolute(self.data.data_dir, always=True),
            tokenizer=self.data.tokenizer if self.data.tokenizer == "byte" else _absolute(self.data.tokenizer),
            chat_template=_absolute(self.data.chat_template))
        return dataclasses.replace(
            self, data=data, adapt=dataclasses.replace(self.adapt, init=_absolute(self.adapt.init)),
            distill=dataclasses.replace(self.distill, teacher=_absolute(self.distill.teacher)),
            dpo=dataclasses.replace(self.dpo, reference=_absolute(self.dpo.reference)))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Config":
        sections = {f.name: f.type for f in dataclasses.fields(cls)}
        for k in d:
            if k not in sections:
                raise ValueError(f"unknown config section {k!r}" + closest(k, sections))
        return cls(
            model=ModelConfig.from_dict(d.get("model", {})) if "model" in d else ModelConfig.preset("gpt2-tiny"),
            data=_section(DataConfig, "data", d.get("data", {})),
            optim=_section(OptimConfig, "optim", d.get("optim", {})),
            train=_section(TrainConfig, "train", d.get("train", {})),
            mesh=_section(MeshConfig, "mesh", d.get("mesh", {})),
            adapt=_section(AdaptConfig, "adapt", d.get("adapt", {})),
            prune=_section(PruneConfig, "prune", d.get("prune", {})),
            distill=_section(DistillConfig, "distill", d.get("distill", {})),
            dpo=_section(DPOConfig, "dpo", d.get("dpo", {})),
        )


def _absolute(path: str, *, pattern: bool = False, always: bool = False) -> str:
    """``path`` made absolute if it exists (or is a glob ``pattern``, or ``always``); else as given."""
    p = Path(path.strip()).expanduser() if path else None
    if p is None or not (always or p.exists() or (pattern and any(c in path for c in "*?["))):
        return path
    return str(p.absolute())


def _section(cls, name, values: dict):
    fields = {f.name: f.type for f in dataclasses.fields(cls)}
    values = dict(values)
    for k, v in values.items():
        if k not in fields:
            raise ValueError(f"unknown config key {name}.{k}" + closest(k, fields).replace("'", f"'{name}.", 1))
        values[k] = v = typed(f"{name}.{k}", v, fields[k])
        allowed = _TRAIN_CHOICES.get((name, k))
        if allowed and v not in allowed:
            raise ValueError(f"{name}.{k}={v!r} is not one of {', '.join(allowed)}" + closest(str(v), allowed))
    return cls(**values)


def typed(name: str, value, annotation: str):
    """``value`` as the field's declared type ("int", "float | None", "tuple[str, ...]", ...): ints
    pass as floats, numbers as strings; anything else is a ValueError naming the key."""
    kinds = [k.strip() for k in str(annotation).split("|")]
    if value is None and "None" in kinds:
        return None
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    for kind in kinds:
        if kind == "bool" and isinstance(value, bool):
            return value
        if kind == "int" and number and float(value).is_integer():
            return int(value)
        if kind == "float" and number:
            return float(value)
        if kind == "str" and (isinstance(value, str) or number):
            return str(value)
        if kind.startswith("tuple") and (isinstance(value, str) or (isinstance(value, (list, tuple))
                                                                   and all(isinstance(x, str) for x in value))):
            return value
    want = " or ".join("a comma-separated list" if k.startswith("tuple") else
                       {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false",
                        "None": "null"}.get(k, k) for k in kinds)
    raise ValueError(f"{name}={value!r} must be {want}")


def _field_types() -> dict:
    sections = {f.name: f.type for f in dataclasses.fields(Config)}
    sections["model"] = "ModelConfig"
    classes = {"ModelConfig": ModelConfig, **{c.__name__: c for c in (DataConfig, OptimConfig, TrainConfig, MeshConfig,
                                                                      AdaptConfig, PruneConfig, DistillConfig,
                                                                      DPOConfig)}}
    return {(name, f.name): f.type for name, cls in sections.items() for f in dataclasses.fields(classes[cls])}


class _Loader(yaml.SafeLoader):
    """yaml.safe_load, except that 1e-5 / 3E+4 read as floats (YAML 1.1 needs a dot: '1.0e-5'),
    so JSON files (e.g. a run's own config.json) and plain YAML both work as config files."""


_Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(
    r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))


def _yaml_load(text: str):
    return yaml.load(text, Loader=_Loader)


def _parse_value(text: str, annotation: str = ""):
    """An override's text as YAML (numbers, booleans, null, lists), except for plain string fields,
    which take the text as written (``data.path=yes`` is the file "yes", not True; ``null`` is None
    where the field allows it); text that is
    not valid YAML stays a string, for the field's type check to judge."""
    if annotation == "str | None" and text in ("null", "Null", "NULL", "~", "None"):
        return None
    if text == "" or annotation in ("str", "str | None"):
        return text
    try:
        return _yaml_load(text)
    except yaml.YAMLError:
        return text


_FIELD_TYPES = _field_types()  # (section, field) -> declared type, for parsing overrides


def load_config(path=None, overrides=()) -> Config:
    """A Config from an optional YAML file and ``key=value`` overrides (``model=NAME`` picks a preset;
    ``model.FIELD=V`` changes one field). Unknown keys are rejected with the closest valid name."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        raw = _yaml_load(p.read_text()) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"config file {path} must hold a mapping of sections")
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key=value (e.g. train.steps=100)")
        key, text = item.split("=", 1)
        section, _, field = key.partition(".")
        if section == "model" and not field:
            raw.setdefault("model", {})
            raw["model"] = {**({} if not isinstance(raw["model"], dict) else raw["model"]), "preset": text}
            continue
        if not field:
            raise ValueError(f"override {item!r} must name a field: SECTION.FIELD=VALUE (e.g. train.steps=100)")
        raw.setdefault(section, {})
        if not isinstance(raw[section], dict):
            raise ValueError(f"unknown config section {section!r}")
        raw[section][field] = _parse_value(text, _FIELD_TYPES.get((section, field), ""))
    model = raw.pop("model", None)
    if isinstance(model, str):
        model = {"preset": model}
    model = dict(model or {})
    preset = model.pop("preset", None) or "gpt2-tiny"
    if not isinstance(preset, str):
        raise ValueError(f"model={preset!r} must be a preset name: {', '.join(PRESETS)}")
    fields = {f.name: f.type for f in dataclasses.fields(ModelConfig)}
    for k in model:
        if k not in fields:
            raise ValueError(f"unknown config key model.{k}" + closest(k, fields).replace("'", "'model.", 1))
        model[k] = typed(f"model.{k}", model[k], fields[k])
    cfg = Config.from_dict({k: v for k, v in raw.items()})
    return dataclasses.replace(cfg, model=ModelConfig.preset(preset, **model))
