"""jaxlm -> Hugging Face: ``export(src, dst)`` writes config.json, generation_config.json,
safetensors shards (with an index past ``max_shard_size``) and the tokenizer files, tensor group
by tensor group. LoRA adapters are merged into their kernels on the way.

A jaxlm model dir is read one layer's parameter at a time (orbax partial loads) and each
safetensors file is written as its tensors are computed, so memory does not grow with the number
of layers; a training workdir or an HF dir is read whole first (``read_model``).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from jaxlm.compress.lora import merged_kernel
from jaxlm.config import ModelConfig
from jaxlm.io import checksums
from jaxlm.io.atomic import atomic_dir, check_destination
from jaxlm.io.hf import family_of
from jaxlm.io.hf.weights import DTYPES, export_plan, flatten, parse_size, write_safetensors
from jaxlm.io.hub import local_dir
from jaxlm.io.model_dir import is_model_dir, param_metadata, read_config, read_param, stored_metadata
from jaxlm.io.peft import CONFIG, WEIGHTS, adapter_config, adapter_tensors
from jaxlm.io.read import read_model
from jaxlm.tokenizer import load_tokenizer
from jaxlm.transformer import abstract_params, unstack_layers


def export(src, dst, *, max_shard_size="5GB", dtype: str | None = None, peft: bool = False,
           overwrite: bool = False, log=None) -> Path:
    """Write the model at ``src`` (anything ``read_model`` takes) as a Hugging Face model dir.

    ``peft``: write the base model without its LoRA adapters, and the adapters as a PEFT adapter
    dir in DST/adapter (base_model_name_or_path: DST) instead of merging them.
    """
    shard_bytes = parse_size(max_shard_size)
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"--dtype={dtype} is not one of {', '.join(DTYPES)}")
    final = check_destination(dst, overwrite=overwrite)  # before any reading
    config, read, dtype_of, tokenizer = _source(src)
    adapted = config
    if peft:
        if not config.lora_rank:
            raise ValueError(f"--peft: {src} has no LoRA adapters (train with adapt.method=lora, or export without --peft)")
        config = config.replace(lora_rank=0)  # the base, as it was
    else:
        config, read = _merged(config, read)
    family = family_of(config)
    hf_config = family.config_to_hf(config)
    _check_exportable(config, family)
    arch = hf_config["architectures"][0]
    with atomic_dir(dst, overwrite) as tmp:
        plan = export_plan(config, family, read, dtype_of, bare=arch in family.BARE, dtype=dtype)
        files = write_safetensors(tmp, plan, shard_bytes)
        dtypes = {dt.name for _, _, dt, _ in plan}
        stored = dtype or ("bfloat16" if "bfloat16" in dtypes else "float16" if "float16" in dtypes else "float32")
        Path(tmp, "config.json").write_text(json.dumps({**hf_config, "dtype": stored, "torch_dtype": stored},
                                                       indent=2) + "\n")
        generation = {k: getattr(config, f"{k}_token_id") for k in ("bos", "eos", "pad")}
        Path(tmp, "generation_config.json").write_text(json.dumps(
            {f"{k}_token_id": v for k, v in generation.items() if v is not None}, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save(tmp)
        if peft:
            _write_adapter(adapted, family, read, tmp / "adapter", base=str(final), bare=arch in family.BARE)
            files.append("adapter/")
    if log is not None:
        log(f"exported {src} -> {dst} ({arch}, {stored}): {', '.join(files)}")
    return Path(dst)


def _write_adapter(config: ModelConfig, family, read, directory: Path, *, base: str, bare: bool) -> None:
    directory.mkdir()
    tensors = dict(adapter_tensors(config, family, read, bare=bare))
    save_file(tensors, str(directory / WEIGHTS), metadata={"format": "pt"})
    (directory / CONFIG).write_text(json.dumps(adapter_config(config, family, base, bare=bare), indent=2) + "\n")


def _source(src):
    """(config, read(path), dtype_of(path), tokenizer): parameters by their path in the per-layer
    layout ("layers.blocks.<i>. ..."), as numpy arrays."""
    d = local_dir(src)
    if is_model_dir(d):  # one layer (or one parameter outside the layers) at a time, from disk
        checksums.verify(d)
        params = d / "params"
        stored = stored_metadata(params)  # read once, not once per tensor
        meta = param_metadata(params, stored)
        stacked = functools.lru_cache(maxsize=2)(lambda name: np.asarray(read_param(params, name, stored)))

        def locate(name):  # (stored name, layer to take from a stacked leaf or None)
            if name in meta:
                return name, None
            parts = name.split(".")  # a directory written stacked: layers.blocks.<i>.x -> layers.blocks.x [i]
            return ".".join(parts[:2] + parts[3:]), int(parts[2])

        @functools.lru_cache(maxsize=1)  # the plan reads layer by layer: one layer's tensors in memory
        def block(i):
            return read_param(params, f"layers.blocks.{i}", stored)

        def read(name):
            name_, layer = locate(name)
            if layer is not None:
                return stacked(name_)[layer]
            parts = name_.split(".")
            if parts[:2] == ["layers", "blocks"] and parts[2].isdigit():
                leaf = block(int(parts[2]))
                for k in parts[3:]:
                    leaf = leaf[k]
                return np.asarray(leaf)
            return np.asarray(read_param(params, name_, stored))

        return read_config(d), read, lambda name: meta[locate(name)[0]][1], load_tokenizer(d)
    config, params, tokenizer = read_model(d)
    flat = flatten(unstack_layers(params, config.n_layers))
    return config, lambda name: np.asarray(flat[name]), lambda name: flat[name].dtype, tokenizer


def _merged(config: ModelConfig, read):
    """The config and reader of the model with its LoRA adapters folded into the kernels."""
    if not config.lora_rank:
        return config, read
    scale = config.lora_alpha / config.lora_rank

    def merged(name):
        owner = name.rsplit(".", 1)[0]
        if name.endswith(".kernel") and owner.split(".")[-1] in config.lora_targets and name.startswith("layers."):
            return np.asarray(merged_kernel(read(name), read(owner + ".lora_a"), read(owner + ".lora_b"), scale))
        return read(name)

    return config.replace(lora_rank=0), merged


def _check_exportable(config: ModelConfig, family) -> None:
    """Refuse what has no Hugging Face tensors: int8 or factored kernels, a soft prompt, or any
    parameter the family's rules do not write (e.g. a GPT-2 classification head)."""
    if config.quantize != "none" or config.factor_rank:
        raise ValueError("export a float model: int8 / low-rank factored kernels have no Hugging Face form here")
    if config.prompt_length:
        raise ValueError("a soft prompt (prompt tuning) has no Hugging Face form; export the base model")
    written = {path for rule in family.rules(config) if rule.to_hf is not None for path, _ in rule.targets}
    left = sorted(set(flatten(abstract_params(config))) - written)
    if left:
        raise ValueError(f"{family.MODEL_TYPE} has no Hugging Face tensor for parameter {left[0]}"
                         + (f" (and {len(left) - 1} more)" if len(left) > 1 else ""))
