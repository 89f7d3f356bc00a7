"""``read_model(path) -> (ModelConfig, params, tokenizer)`` for every kind of path that names a model."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.compress import tree
from jaxlm.compress.adapt import trainable
from jaxlm.config import Config, ModelConfig, fields_of
from jaxlm.io.checkpoints import TrainCheckpoints, is_workdir
from jaxlm.io.hf import family_of, hf_to_params, is_hf_dir
from jaxlm.io.hub import local_dir
from jaxlm.io.model_dir import is_model_dir, read_model_dir
from jaxlm.io.peft import is_peft_dir, read_adapter
from jaxlm.tokenizer import load_tokenizer
from jaxlm.transformer import abstract_model, params_for, stack_layers


def read_model(path):
    """(config, params, tokenizer or None) from a jaxlm model dir, a training workdir (its latest
    checkpoint; with adapters or a soft prompt, merged onto the base model it started from), a
    Hugging Face model dir or hub id, or a PEFT LoRA adapter dir (with the base it names). Params are on one device, in either layer layout: pass
    them through ``transformer.params_for(config, params)`` for the one ``config`` asks for."""
    d = local_dir(path)
    if is_peft_dir(d):
        return read_peft(d)
    if is_model_dir(d):
        return read_model_dir(d)
    if is_workdir(d):
        return read_workdir(d)
    if is_hf_dir(d):
        config, params = hf_to_params(d)
        return config, jax.tree.map(jnp.asarray, params), load_tokenizer(d)
    raise ValueError(f"{path} holds no model: expected the config.json of a jaxlm or Hugging Face model")


def read_workdir(path):
    """(model config, params in the run's layout, tokenizer) from a training workdir's latest checkpoint."""
    cfg = Config.from_dict(json.loads(Path(path, "config.json").read_text()))
    ckpts = TrainCheckpoints(path)
    step = ckpts.latest_step()
    if step is None:
        raise ValueError(f"training workdir {path} holds no complete checkpoint yet")
    try:
        ckpts.verify(step)
    except BaseException:
        ckpts.close()
        raise
    one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    # Training checkpoints keep the run's own layout (stacked or per-layer, by model.scan_layers).
    layout = nnx.to_pure_dict(nnx.state(abstract_model(cfg.model), nnx.Param))
    adapted = cfg.adapt.method != "full"
    if adapted:  # the checkpoints hold the adapters or prompt; the frozen base is the model they started from
        layout, _ = tree.split(layout, trainable(cfg.adapt.method))
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=one), layout)
    params = ckpts.restore_params(step, abstract)
    ckpts.close()
    if adapted:
        base_config, base_params, _ = read_base(cfg.adapt.init, f"{path} (adapt.method={cfg.adapt.method})")
        check_same_base(base_config, cfg.model, cfg.adapt.init)
        params = tree.merge(params_for(cfg.model, base_params), params)
    return cfg.model, params, load_tokenizer(path)


def read_peft(path):
    """(config with LoRA adapters, params, tokenizer) from a PEFT LoRA dir and the base model its
    adapter_config.json names (``base_model_name_or_path``)."""
    base = json.loads(Path(path, "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{path}/adapter_config.json names no base_model_name_or_path")
    base_config, base_params, tokenizer = read_base(base, f"the PEFT adapter {path}")
    config, adapters = read_adapter(path, base_config, family_of(base_config))
    params = tree.copy_dicts(stack_layers(base_params))
    for owner, (a, b) in adapters.items():
        node = tree.get(params, owner.split("."))
        node["lora_a"], node["lora_b"] = jnp.asarray(a), jnp.asarray(b)
    return config, params, tokenizer


def read_base(init: str, user: str):
    """read_model(init) for a model another one depends on, naming the dependant when it is gone."""
    try:
        return read_model(init)
    except (FileNotFoundError, NotADirectoryError) as e:
        raise FileNotFoundError(f"{user} starts from {init}, which cannot be read: {e}") from None


def check_same_base(base: ModelConfig, adapted: ModelConfig, where: str) -> None:
    """Refuse a base model whose parameters are not the ones the adapters were trained on."""
    f = base.first_difference(adapted, fields_of("shape"))
    if f is not None:
        raise ValueError(f"the base model {where} no longer matches its adapters (model.{f}: "
                         f"{getattr(base, f)!r} there, {getattr(adapted, f)!r} when they were trained)")
