"""The public Python surface: ``jaxlm.load(path) -> LM``."""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlm.config import ModelConfig
from jaxlm.transformer import abstract_model


@functools.partial(jax.jit, static_argnames=("graphdef", "output"))
def _apply(graphdef, params, input_ids, attention_mask, token_type_ids, output: str):
    model = nnx.merge(graphdef, params)
    if output == "hidden":
        return model.hidden_states(input_ids, attention_mask, token_type_ids)
    return model(input_ids, attention_mask, token_type_ids)


class LM:
    """A loaded model: ``config``, ``tokenizer`` (or None) and ``params`` (a pure dict of arrays)."""

    def __init__(self, config: ModelConfig, params, tokenizer=None):
        self.config = config
        self.params = params
        self.tokenizer = tokenizer
        self._graphdef = nnx.graphdef(abstract_model(config))

    def __repr__(self):
        n = sum(x.size for x in jax.tree.leaves(self.params))
        return f"LM({self.config.name!r}, {self.config.arch}, {n / 1e6:.1f}M params, tokenizer={self.tokenizer!r})"

    def model(self):
        """The Flax NNX module holding these parameters (for custom use)."""
        return nnx.merge(self._graphdef, self.params)

    def _inputs(self, input_ids, attention_mask, token_type_ids):
        ids = np.asarray(input_ids)
        if ids.ndim == 1:
            ids = ids[None]
        if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"input_ids must be integers of shape [batch, length], got {ids.dtype} {ids.shape}")
        v, t = self.config.vocab_size, ids.shape[1]
        if ids.size and (ids.min() < 0 or ids.max() >= v):
            bad = ids.min() if ids.min() < 0 else ids.max()
            raise ValueError(f"input id {bad} is outside the vocabulary: ids must be in [0, {v})")
        if t > self.config.max_len:
            raise ValueError(f"sequence length {t} exceeds the model's context of {self.config.max_len} tokens")
        mask = np.ones(ids.shape, bool) if attention_mask is None else np.asarray(attention_mask).reshape(ids.shape).astype(bool)
        types = None if token_type_ids is None else jnp.asarray(np.asarray(token_type_ids).reshape(ids.shape), jnp.int32)
        return jnp.asarray(ids, jnp.int32), jnp.asarray(mask), types

    def logits(self, input_ids, attention_mask=None, token_type_ids=None):
        """Float32 logits: [B, T, V] next-token (decoder) or MLM (encoder); [B, C] for classifiers."""
        return _apply(self._graphdef, self.params, *self._inputs(input_ids, attention_mask, token_type_ids), "logits")

    def hidden_states(self, input_ids, attention_mask=None, token_type_ids=None):
        """Final hidden states [B, T, D] (HF's last_hidden_state)."""
        return _apply(self._graphdef, self.params, *self._inputs(input_ids, attention_mask, token_type_ids), "hidden")

    def save(self, path, *, overwrite: bool = False) -> Path:
        """Write a jaxlm model directory (config.json, params/, tokenizer files)."""
        from jaxlm.checkpoint import save_model

        return save_model(path, self.config, self.params, self.tokenizer, overwrite=overwrite)


RUNTIME_FIELDS = {"dtype", "scan_layers", "remat", "attention_impl"}


def load(path, **config_overrides) -> LM:
    """Load a jaxlm model dir or a Hugging Face model dir / hub id.

    ``config_overrides`` change how the model is computed (e.g. ``dtype="bfloat16"``,
    ``scan_layers=False``), never its shape.
    """
    from jaxlm.checkpoint import is_model_dir, load_model
    from jaxlm.convert import hf_to_params, is_hf_dir, local_dir
    from jaxlm.tokenizer import load_tokenizer

    d = local_dir(path)
    if is_model_dir(d):
        config, params, tokenizer = load_model(d)
    elif is_hf_dir(d):
        config, params = hf_to_params(d)
        params = jax.tree.map(jnp.asarray, params)
        tokenizer = load_tokenizer(d)
    else:
        raise ValueError(f"{path} holds no model: expected the config.json of a jaxlm or Hugging Face model")
    bad = sorted(set(config_overrides) - RUNTIME_FIELDS)
    if bad:
        raise ValueError(f"load() can override only {', '.join(sorted(RUNTIME_FIELDS))}; got {bad[0]!r}")
    if config_overrides:
        config = config.replace(**config_overrides)
    return LM(config, params, tokenizer)
