"""LoRA adapters in the PEFT format (``adapter_config.json`` + ``adapter_model.safetensors``),
both ways, for the families whose block kernels are torch Linear modules (BERT and the Llama
layout; GPT-2's fused Conv1D ``c_attn`` has no per-kernel form).

PEFT stores ``lora_A.weight`` [r, in] and ``lora_B.weight`` [out, r] per module and layer, with
the update (lora_alpha / r) B A; jaxlm keeps A [in, r] and B [r, out] stacked over layers, with
the update (lora_alpha / r) A B: the same numbers, transposed.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
from safetensors import safe_open

from jaxlm.config import ModelConfig
from jaxlm.io.hf.weights import layer_path

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
ROOT = "base_model.model."  # how PEFT names the wrapped model's modules in its files


def is_peft_dir(path) -> bool:
    return Path(path, CONFIG).is_file()


def kernel_modules(config: ModelConfig, family, *, bare: bool) -> dict[str, tuple[str, str]]:
    """{block kernel (q, k, ...): (HF module name with "{}" for the layer, jaxlm kernel path)}."""
    out = {}
    for rule in family.rules(config):
        path = rule.targets[0][0] if len(rule.targets) == 1 else ""
        kernel = path.split(".")[-2] if path.startswith("layers.blocks.") and path.endswith(".kernel") else None
        if rule.torch_linear and kernel in config.block_kernels and rule.name.endswith(".weight"):
            out[kernel] = (("" if bare or rule.head else family.PREFIX) + rule.name[:-len(".weight")], path)
    return out


def adapter_tensors(config: ModelConfig, family, read, *, bare: bool):
    """Yield (PEFT tensor name, array) for every LoRA adapter of the model, layer by layer
    (``read(path)``: a parameter by its path in the per-layer layout)."""
    modules = kernel_modules(config, family, bare=bare)
    for kernel in config.lora_targets:
        if kernel not in modules:
            raise ValueError(f"LoRA on the {kernel!r} kernels has no PEFT form for {family.MODEL_TYPE} "
                             "(export the adapters merged instead)")
        module, path = modules[kernel]
        for layer in range(config.n_layers):
            owner = layer_path(path, layer).rsplit(".", 1)[0]
            name = ROOT + module.format(layer)
            yield name + ".lora_A.weight", np.ascontiguousarray(np.asarray(read(owner + ".lora_a")).T)  # [in, r] -> [r, in]
            yield name + ".lora_B.weight", np.ascontiguousarray(np.asarray(read(owner + ".lora_b")).T)  # [r, out] -> [out, r]


def adapter_config(config: ModelConfig, family, base: str, *, bare: bool) -> dict:
    """adapter_config.json: target modules as one regex over the base model's module names."""
    modules = kernel_modules(config, family, bare=bare)
    names = [re.escape(modules[k][0]).replace(r"\{\}", r"\d+") for k in config.lora_targets]
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM" if config.causal else "FEATURE_EXTRACTION",
            "base_model_name_or_path": base, "r": config.lora_rank, "lora_alpha": config.lora_alpha,
            "target_modules": "(?:" + "|".join(names) + ")", "lora_dropout": 0.0, "bias": "none",
            "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "modules_to_save": None,
            "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {}, "inference_mode": True,
            "init_lora_weights": True}


def read_adapter(path, base_config: ModelConfig, family):
    """(config with the adapters, {kernel path's owner: (lora_a [L, in, r], lora_b [L, r, out])})
    from a PEFT LoRA dir made for a model of ``base_config`` (with or without its head module)."""
    path = Path(path)
    conf = json.loads((path / CONFIG).read_text())
    for key, ok in (("peft_type", "LORA"), ("bias", "none"), ("use_rslora", False), ("use_dora", False),
                    ("fan_in_fan_out", False), ("modules_to_save", None), ("layers_to_transform", None)):
        if conf.get(key, ok) not in (ok, [] if ok is None else ok):
            raise ValueError(f"{path / CONFIG}: {key}={conf[key]!r} is not supported (jaxlm reads {key}={ok!r})")
    for key in ("rank_pattern", "alpha_pattern"):
        if conf.get(key):
            raise ValueError(f"{path / CONFIG}: per-module {key} is not supported (one rank and alpha for all)")
    modules = kernel_modules(base_config, family, bare=True)
    prefix = f"(?:{re.escape(family.PREFIX)})?"
    patterns = {k: re.compile(re.escape(ROOT) + prefix + re.escape(m).replace(r"\{\}", r"(\d+)")
                              + r"\.lora_([AB])\.weight") for k, (m, _) in modules.items()}
    found: dict[str, dict] = {}
    with safe_open(str(path / WEIGHTS), framework="np") as f:
        for name in f.keys():
            for kernel, pattern in patterns.items():
                m = pattern.fullmatch(name)
                if m:
                    found.setdefault(kernel, {})[(int(m.group(1)), m.group(2))] = f.get_tensor(name)
                    break
            else:
                raise ValueError(f"{path / WEIGHTS}: tensor {name} adapts no block kernel jaxlm knows "
                                 f"({', '.join(modules)})")
    rank, layers = int(conf["r"]), range(base_config.n_layers)
    adapters = {}
    for kernel, pieces in found.items():
        missing = [f"layer {i} {ab}" for i in layers for ab in "AB" if (i, ab) not in pieces]
        if missing:
            raise ValueError(f"{path / WEIGHTS}: the {kernel!r} adapters lack {missing[0]} (jaxlm adapts every layer)")
        owner = modules[kernel][1].rsplit(".", 1)[0]
        adapters[owner] = (np.stack([pieces[(i, "A")].T for i in layers]), np.stack([pieces[(i, "B")].T for i in layers]))
    targets = tuple(k for k in base_config.block_kernels if k in found)
    config = base_config.replace(lora_rank=rank, lora_alpha=float(conf["lora_alpha"]), lora_targets=targets)
    return config, adapters
