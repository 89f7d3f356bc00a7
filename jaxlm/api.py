"""The public Python surface: ``jaxlm.load(path) -> LM`` (``io.read_model`` + ``LM``)."""

from __future__ import annotations

import contextlib
import functools
import numbers
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlm.classify import ClassRows
from jaxlm.config import RUNTIME_FIELDS, MeshConfig, ModelConfig
from jaxlm.generate import generate_ids
from jaxlm.io import read_model, save_model
from jaxlm.sampling import Sampling, end_ids
from jaxlm.sharding import check_model_fits, make_mesh, param_shardings
from jaxlm.speculative import DEFAULT_K, MAX_K, speculate_ids
from jaxlm.transformer import model_graphdef, params_for


# lm.generate's names for Sampling's fields, in its error messages.
GENERATE_NAMES = {"max_tokens": "max_new_tokens", "n": "num_return_sequences"}


@functools.partial(jax.jit, static_argnames=("graphdef", "output"))
def _apply(graphdef, params, input_ids, attention_mask, token_type_ids, output: str):
    model = nnx.merge(graphdef, params)
    if output == "hidden":
        return model.hidden_states(input_ids, attention_mask, token_type_ids)
    return model(input_ids, attention_mask, token_type_ids)


class LM:
    """A loaded model: ``config``, ``tokenizer`` (or None) and ``params`` (a pure dict of arrays)."""

    def __init__(self, config: ModelConfig, params, tokenizer=None, *, mesh=None):
        self.config = config
        self.params = params_for(config, params)
        self.tokenizer = tokenizer
        self.graphdef = model_graphdef(config)  # the module structure, static under jit
        if isinstance(mesh, MeshConfig):
            mesh = make_mesh(mesh)
        self.mesh = mesh  # None: one device
        self.last_speculation = None  # SpeculationStats of the last speculative generate()
        self._drafts = {}  # draft models loaded from paths by generate(draft=PATH)
        if mesh is not None:  # parameters split by the logical-axis rules (e.g. heads over tensor)
            check_model_fits(config, mesh)
            self.params = jax.device_put(self.params, param_shardings(config, mesh))

    def on_mesh(self):
        """A context in which this model's programs run on its mesh (a no-op on one device)."""
        return jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()

    @property
    def eos_id(self) -> int | None:
        """The token that ends a generated sequence (the config's, else the tokenizer's; None: none)."""
        return end_ids(self.config, self.tokenizer)[0]

    @property
    def pad_id(self) -> int:
        """The id that fills a generated row after its end (and pads prompts)."""
        return end_ids(self.config, self.tokenizer)[1]

    def __repr__(self):
        n = sum(x.size for x in jax.tree.leaves(self.params))
        return f"LM({self.config.name!r}, {self.config.arch}, {n / 1e6:.1f}M params, tokenizer={self.tokenizer!r})"

    def model(self):
        """The Flax NNX module holding these parameters (for custom use)."""
        return nnx.merge(self.graphdef, self.params)

    def _inputs(self, input_ids, attention_mask, token_type_ids):
        ids = np.asarray(input_ids)
        if ids.ndim == 1:
            ids = ids[None]
        if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"input_ids must be integers of shape [batch, length], got {ids.dtype} {ids.shape}")
        v, t = self.config.vocab_size, ids.shape[1]
        if ids.size == 0:
            raise ValueError(f"input_ids of shape {ids.shape} is empty: give at least one row of at least one token")
        if ids.min() < 0 or ids.max() >= v:
            bad = ids.min() if ids.min() < 0 else ids.max()
            raise ValueError(f"input id {bad} is outside the vocabulary: ids must be in [0, {v})")
        if t > self.config.context:
            raise ValueError(f"sequence length {t} exceeds the model's context of {self.config.context} tokens")
        def like_ids(name, x):
            x = np.asarray(x)
            if x.size != ids.size:
                raise ValueError(f"{name} has shape {x.shape}, input_ids {ids.shape}: they must match")
            return x.reshape(ids.shape)

        mask = np.ones(ids.shape, bool) if attention_mask is None else like_ids("attention_mask", attention_mask).astype(bool)
        types = None if token_type_ids is None else jnp.asarray(like_ids("token_type_ids", token_type_ids), jnp.int32)
        return jnp.asarray(ids, jnp.int32), jnp.asarray(mask), types

    def logits(self, input_ids, attention_mask=None, token_type_ids=None):
        """Float32 logits: [B, T, V] next-token (decoder) or MLM (encoder); [B, C] for classifiers."""
        with self.on_mesh():
            return _apply(self.graphdef, self.params, *self._inputs(input_ids, attention_mask, token_type_ids),
                          "logits")

    def classify(self, texts) -> list[str]:
        """The predicted class name of each text (head="classify" models)."""
        if self.config.head != "classify":
            raise ValueError(f"classify() needs a classification head; this model's head is {self.config.head!r}")
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer; use logits() with token ids")
        names = self.config.label_names or tuple(str(i) for i in range(self.config.num_labels))
        rows = ClassRows([(t, names[0]) for t in texts], self.tokenizer, names, self.config.context)
        logits = np.asarray(self.logits(rows.ids, rows.mask))
        return [names[i] for i in logits.argmax(-1)]

    def hidden_states(self, input_ids, attention_mask=None, token_type_ids=None):
        """Final hidden states [B, T, D] (HF's last_hidden_state)."""
        with self.on_mesh():
            return _apply(self.graphdef, self.params, *self._inputs(input_ids, attention_mask, token_type_ids),
                          "hidden")

    def generate(self, prompts, max_new_tokens: int = 32, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int = 0, num_return_sequences: int = 1, stop=None,
                 attention_mask=None, on_token=None, draft=None, speculate_k: int | None = None):
        """Continue prompts with the KV-cached, jitted decoder.

        prompts: list[str] -> list[str], the continuations (prompt-major, ``num_return_sequences``
        each), cut before EOS and before the first ``stop`` string.
        prompts: int array [B, T] (+ ``attention_mask`` for left padding) or a list of id lists
        -> int array [B * n, T + max_new_tokens]: the prompts followed by the new tokens (pad after EOS).
        temperature 0 is greedy; the same seed gives the same output.
        ``on_token(step, token_ids[B * n])`` is called as each token is produced (streaming).

        Speculative decoding: ``draft`` (an ``LM``, a model path, or ``"prompt_lookup"``) proposes
        ``speculate_k`` tokens (default ``speculative.DEFAULT_K``, 4) that this model checks in one pass; the output follows
        this model's distribution exactly (greedy: the same tokens). ``last_speculation`` then holds
        the call's ``SpeculationStats`` (acceptance rate, tokens per pass).
        """
        cfg = self.config
        if not cfg.causal:
            raise ValueError(f"generate() needs a decoder model; {cfg.name!r} is an {cfg.arch}")
        if cfg.head != "lm":
            raise ValueError(f"generate() needs a language-model head; this model's head is {cfg.head!r}")
        texts = isinstance(prompts, (list, tuple)) and len(prompts) > 0 and isinstance(prompts[0], str)
        if isinstance(prompts, str):
            raise ValueError("prompts must be a list of strings (or of token id lists), not one string")
        if texts:
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer; pass token ids instead of strings")
            rows = [self.tokenizer.encode(t, add_special_tokens=False) for t in prompts]
            width = None
        else:
            rows, width = self._prompt_rows(prompts, attention_mask)
        if len(rows) == 0:
            raise ValueError("prompts is empty: give at least one prompt")
        for i, r in enumerate(rows):
            if not r:
                raise ValueError(f"prompt {i} is empty: give at least one token")
        sampling = Sampling(temperature, top_k, top_p, max_new_tokens, num_return_sequences, seed).check(
            cfg.vocab_size, names=GENERATE_NAMES)
        longest = max(len(r) for r in rows)
        if longest + max_new_tokens > cfg.context:
            raise ValueError(f"prompt of {longest} tokens + max_new_tokens={max_new_tokens} exceeds the "
                             f"model's context of {cfg.context} tokens")
        proposer, k = self.proposer(draft, speculate_k, longest + max_new_tokens)
        eos, pad = self.eos_id, self.pad_id
        kw = dict(sampling=sampling, eos_id=eos, pad_id=pad, on_token=on_token)
        with self.on_mesh():
            if k:
                new, self.last_speculation = speculate_ids(self.graphdef, self.params, cfg, rows, draft=proposer,
                                                           k=k, **kw)
            else:
                new = generate_ids(self.graphdef, self.params, cfg, rows, **kw)
        if not texts:
            n = num_return_sequences
            head = np.full((len(rows) * n, width), pad, np.int64)
            for i, r in enumerate(rows):
                head[i * n:(i + 1) * n, width - len(r):] = r
            return np.concatenate([head, new], axis=1)
        return [self.continuation(row, stop)[0] for row in new]

    def proposer(self, draft, speculate_k, length: int, length_name: str | None = None):
        """(draft (graphdef, params) or None for prompt lookup, K); K = 0: no speculation. ``length``:
        the tokens the draft must hold (prompt and new ones, or the server's ``length_name``)."""
        if draft is None:
            if speculate_k is not None:
                raise ValueError("speculate_k needs a draft: pass draft=LM, a model path or 'prompt_lookup'")
            return None, 0
        k = DEFAULT_K if speculate_k is None else speculate_k
        if not isinstance(k, numbers.Integral) or isinstance(k, bool):
            raise ValueError(f"speculate_k={k!r} must be an integer")
        limit = min(MAX_K, self.config.context - 1)
        if not 1 <= k <= limit:
            raise ValueError(f"speculate_k={k} must be in [1, {limit}] (the target's context is "
                             f"{self.config.context} tokens)")
        if isinstance(draft, str) and draft == "prompt_lookup":
            return None, k
        if isinstance(draft, (str, Path)):  # loaded once per path and kept for later calls
            key = str(Path(draft).resolve()) if Path(draft).exists() else str(draft)
            if key not in self._drafts:
                self._drafts[key] = load(draft)
            draft = self._drafts[key]
        if not isinstance(draft, LM):
            raise ValueError(f"draft={draft!r} must be an LM, a model path or 'prompt_lookup'")
        d = draft.config
        if not d.causal or d.head != "lm":
            raise ValueError(f"the draft {d.name!r} is an {d.arch} with a {d.head!r} head; it must be a decoder "
                             "language model")
        if d.vocab_size != self.config.vocab_size:
            raise ValueError(f"the draft's vocabulary has {d.vocab_size} tokens, the target's {self.config.vocab_size}: "
                             "they must share one tokenizer")
        if length > d.context:
            if length_name is not None:
                raise ValueError(f"{length_name}={length} exceeds the draft's context of {d.context} tokens: "
                                 f"use {length_name} <= {d.context}")
            raise ValueError(f"{length} tokens (prompt and new ones) exceed the draft's context of "
                             f"{d.context} tokens")
        params = draft.params
        if self.mesh is not None:  # the draft is small: a full copy on every device of the target's mesh
            params = jax.device_put(params, jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec()))
        return (draft.graphdef, params), k

    def _prompt_rows(self, prompts, attention_mask):
        """Ids (array [B, T] with optional mask, or ragged lists) -> (list of real-token lists, T)."""
        if isinstance(prompts, (list, tuple)) and prompts and not np.isscalar(prompts[0]) and \
                len({len(p) for p in prompts}) > 1 and attention_mask is None:
            rows = [list(map(int, p)) for p in prompts]
            return rows, max(len(r) for r in rows)
        ids = np.asarray(prompts)
        if ids.size == 0:
            return [], 0
        ids, mask, _ = self._inputs(ids, attention_mask, None)
        ids, mask = np.asarray(ids), np.asarray(mask)
        return [list(map(int, r[m])) for r, m in zip(ids, mask)], ids.shape[1]

    def continuation(self, new_ids, stop=None) -> tuple[str, list[int]]:
        """(text, ids) of generated ids cut before EOS, the text also before the first stop string."""
        ids = [int(i) for i in new_ids]
        eos = self.eos_id
        if eos is not None and eos in ids:
            ids = ids[:ids.index(eos)]
        text = self.tokenizer.decode(ids)
        for s in [stop] if isinstance(stop, str) else (stop or []):
            if s and s in text:
                text = text[:text.index(s)]
        return text, ids

    def save(self, path, *, overwrite: bool = False) -> Path:
        """Write a jaxlm model directory (config.json, params/, tokenizer files)."""
        return save_model(path, self.config, self.params, self.tokenizer, overwrite=overwrite)


def load(path, *, mesh=None, **config_overrides) -> LM:
    """Load a jaxlm model dir, a training workdir (its latest checkpoint, whatever mesh it was
    trained on), or a Hugging Face model dir / hub id.

    ``mesh`` (a ``MeshConfig`` or a ``jax.sharding.Mesh``) spreads the parameters over devices by
    the logical-axis rules, e.g. ``mesh=MeshConfig(data=1, tensor=4)`` for tensor-parallel
    generation; None keeps them on one device. ``config_overrides`` change how the model is
    computed (the runtime fields: dtype, scan_layers, remat, attention_impl), never its shape.
    Layers run unrolled by default (``scan_layers=False``): faster decoding, slower first compile;
    pass ``scan_layers=True`` for the opposite.
    """
    bad = sorted(set(config_overrides) - set(RUNTIME_FIELDS))
    if bad:
        raise ValueError(f"load() can override only {', '.join(sorted(RUNTIME_FIELDS))}; got {bad[0]!r}")
    config, params, tokenizer = read_model(path)
    return LM(config.replace(**{"scan_layers": False, **config_overrides}), params, tokenizer, mesh=mesh)
