"""Fine-tuning from a pretrained model (``adapt.*``): which parameters train under each method and
the model config a run gets from its base model.

- full: every parameter trains.
- lora: only the low-rank adapters (see lora.py); the base stays frozen and out of checkpoints.
- prompt: only a soft prompt of ``adapt.prompt_length`` vectors before every input.
"""

from __future__ import annotations

from jaxlm.compress.lora import is_adapter
from jaxlm.config import AdaptConfig, ModelConfig, fields_of


def trainable(method: str):
    """path -> whether that parameter trains under adapt.method."""
    if method == "lora":
        return is_adapter
    if method == "prompt":
        return lambda path: path == ("prompt",)
    return lambda path: True


def adapted_config(base: ModelConfig, adapt: AdaptConfig, run: ModelConfig, where: str) -> ModelConfig:
    """The base model's config as the run trains it: the run decides the training and runtime
    fields (dropout, layout, remat, ...); the method adds adapters or a soft prompt."""
    config = base.replace(**{f: getattr(run, f) for f in fields_of("training", "runtime")})
    if adapt.method == "prompt":
        if config.prompt_length:
            raise ValueError(f"{where} has a soft prompt already")
        config = config.replace(prompt_length=adapt.prompt_length)
    if adapt.method == "lora":
        wanted = config.replace(lora_rank=adapt.lora_rank, lora_alpha=adapt.lora_alpha, lora_targets=adapt.lora_targets)
        if config.lora_rank and (config.lora_rank, config.lora_alpha, config.lora_targets) != \
                (wanted.lora_rank, wanted.lora_alpha, wanted.lora_targets):
            raise ValueError(
                f"{where} has LoRA adapters already (rank {config.lora_rank}, alpha {config.lora_alpha:g} on "
                f"{','.join(config.lora_targets)}): set adapt.lora_rank / lora_alpha / lora_targets to those to "
                "train them further, or merge them first (jaxlm merge)")
        config = wanted  # fresh adapters, or the base's own to train further
    return config
