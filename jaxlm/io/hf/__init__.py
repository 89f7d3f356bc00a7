"""Hugging Face model directories <-> jaxlm: one module per family, each holding its config
mapping (both ways) and its weight rules; this module picks the family and runs the conversion.

Families: gpt2, bert, and the Llama layout (llama.py) with its variants mistral, qwen2, qwen3,
gemma, gemma2. Adding a family: a module here with MODEL_TYPE, ARCHITECTURES, PREFIX, SKIP,
``config_from_hf``, ``config_to_hf`` and ``rules`` (see gpt2.py, or mistral.py for a variant of
the Llama layout), listed in ``FAMILIES`` and told apart in ``family_of``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from jaxlm.config import ModelConfig
from jaxlm.io.atomic import atomic_dir
from jaxlm.io.hf import bert, gemma, gemma2, gpt2, llama, mistral, qwen2, qwen3
from jaxlm.io.hf.weights import DTYPES, converted_tensors, unflatten
from jaxlm.io.model_dir import StreamingParamWriter, memory_keys, write_config
from jaxlm.tokenizer import copy_tokenizer_files

_BATCH_BYTES = 64 << 20  # converted tensors handed to orbax per partial save (each call costs ~0.5 s)
FAMILIES = {f.MODEL_TYPE: f for f in (gpt2, bert, llama, mistral, qwen2, qwen3, gemma, gemma2)}


def read_hf_config(src) -> dict:
    src = Path(src)
    if not src.exists():
        raise FileNotFoundError(f"{src} does not exist")
    if not (src / "config.json").is_file():
        raise FileNotFoundError(f"{src} holds no model: config.json not found")
    return json.loads((src / "config.json").read_text())


def is_hf_dir(path) -> bool:
    p = Path(path, "config.json")
    return p.is_file() and "model_type" in json.loads(p.read_text())


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """The ModelConfig of a Hugging Face ``config.json`` dict."""
    model_type = hf.get("model_type")
    supported = [a for f in FAMILIES.values() for a in f.ARCHITECTURES]
    family = FAMILIES.get(model_type)
    arch = (hf.get("architectures") or list(family.ARCHITECTURES if family else ["?"])[:1])[0]
    if family is None or arch not in family.ARCHITECTURES:
        raise ValueError(f"unsupported architecture {arch} (model_type {model_type!r}); "
                         f"supported: {', '.join(supported)}")
    try:
        return family.config_from_hf(hf, arch)
    except KeyError as e:
        raise ValueError(f"{model_type} config.json lacks {e.args[0]!r}") from None


def family_of(config: ModelConfig):
    """The Hugging Face family a jaxlm model is exported as, told by its config's fields."""
    if not config.causal:
        return bert
    if config.positions != "rope":
        return gpt2
    if config.norm_position == "sandwich":
        return gemma2
    if config.norm_unit_offset:
        return gemma
    if config.qk_norm:
        return qwen3
    if config.has_qkv_bias:
        return qwen2
    return mistral if config.sliding_window is not None else llama


def config_to_hf(config: ModelConfig) -> dict[str, Any]:
    """The Hugging Face ``config.json`` dict of a model (its family: ``family_of``)."""
    return family_of(config).config_to_hf(config)


def hf_to_params(src, config: ModelConfig | None = None, log=None, dtype: str | None = None):
    """(config, params) from an HF model dir. params: pure dict of numpy arrays in the per-layer
    layout, each in its stored dtype unless ``dtype`` (float32, bfloat16, float16) says otherwise."""
    hf = read_hf_config(src)
    config = config or config_from_hf(hf)
    flat = dict(converted_tensors(src, config, FAMILIES[hf["model_type"]], log, dtype))
    return config, memory_keys(unflatten(flat))


def convert(src, dst, *, overwrite: bool = False, dtype: str | None = None, log=None) -> Path:
    """HF model dir -> jaxlm model dir (config.json, params/, tokenizer files); the weights keep
    their stored dtype unless ``dtype`` says otherwise."""
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"--dtype={dtype} is not one of {', '.join(DTYPES)}")
    hf = read_hf_config(src)
    config = config_from_hf(hf)
    # Refuse a non-empty DST before the (long) read.
    with atomic_dir(dst, overwrite, seal=True) as tmp:
        # Stream: tensors go to orbax (partial saves) in batches of about 64 MB, one layer's
        # tensor at a time, so memory does not grow with the number of layers.
        writer = StreamingParamWriter(tmp / "params")
        batch, size = {}, 0
        for path, array in converted_tensors(src, config, FAMILIES[hf["model_type"]], log, dtype):
            batch[path], size = array, size + array.nbytes
            if size >= _BATCH_BYTES:
                writer.write(unflatten(batch))
                batch, size = {}, 0
        if batch:
            writer.write(unflatten(batch))
        writer.finalize()
        write_config(tmp, config)
        copied = copy_tokenizer_files(src, tmp)
        if log is not None:
            log(f"converted {src} ({hf.get('architectures', [hf['model_type']])[0]}) -> {dst}"
                f" with tokenizer files: {', '.join(copied) or 'none'}")
    return Path(dst)
