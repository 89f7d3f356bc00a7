"""Transformer blocks and the two model families: Decoder (causal, GPT) and Encoder (bidirectional, BERT).

Dimension legend: B batch, T length, D model, V vocab, C classes, L layers.

Layers are stored stacked (every block parameter has a leading L axis named "layers"), so one
checkpoint layout serves both ``scan_layers=True`` (lax.scan, fast compiles) and the unrolled loop.
Randomness is explicit: dropout is active only when a ``key`` is passed.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.attention import Attention, make_mask
from jaxlm.config import ModelConfig
from jaxlm.layers import (ACTIVATIONS, MLP, Dense, Embed, Norm, dense_options, dropout, param,
                          sinusoidal_positions)


def _split(key, n):
    return [None] * n if key is None else list(jax.random.split(key, n))


def _norm(cfg: ModelConfig) -> Norm:
    return Norm(cfg.d_model, cfg.norm, cfg.norm_eps, unit_offset=cfg.norm_unit_offset)


class Block(nnx.Module):
    """Attention + MLP with residuals: pre-LN x + f(norm(x)), post-LN norm(x + f(x)), or sandwich
    x + norm(f(norm(x))) (Gemma 2: a norm before and after each of attention and MLP)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.norm_position = cfg.norm_position
        self.dropout = cfg.dropout
        self.attn_norm = _norm(cfg)
        self.attn = Attention(cfg, rngs=rngs)
        self.mlp_norm = _norm(cfg)
        self.mlp = MLP(cfg.d_model, cfg.mlp_dim, cfg.activation, use_bias=cfg.use_bias,
                       std=cfg.init_std, dtype=jnp.dtype(cfg.dtype), rngs=rngs, gated=cfg.gated_mlp,
                       options=lambda name: dense_options(cfg, name))
        sandwich = cfg.norm_position == "sandwich"
        self.attn_post_norm = _norm(cfg) if sandwich else None
        self.mlp_post_norm = _norm(cfg) if sandwich else None

    def __call__(self, x, mask, positions, *, kv_cache=None, cache_index=None, key=None, need_probs=False):
        """Returns (x, kv_cache): this layer's cache with the new tokens written (None without one);
        with ``need_probs``, (x, kv_cache, attention probabilities [B, H, T, S])."""
        k_attn, k_mlp = _split(key, 2)
        attn = dict(kv_cache=kv_cache, cache_index=cache_index, key=k_attn, need_probs=need_probs)
        if self.norm_position == "pre":
            h, kv, *probs = self.attn(self.attn_norm(x), mask, positions, **attn)
            x = x + h
            x = x + self.mlp(self.mlp_norm(x), self.dropout, k_mlp)
        elif self.norm_position == "sandwich":
            h, kv, *probs = self.attn(self.attn_norm(x), mask, positions, **attn)
            x = x + self.attn_post_norm(h)
            x = x + self.mlp_post_norm(self.mlp(self.mlp_norm(x), self.dropout, k_mlp))
        else:
            h, kv, *probs = self.attn(x, mask, positions, **attn)
            x = self.attn_norm(x + h)
            x = self.mlp_norm(x + self.mlp(x, self.dropout, k_mlp))
        return (x, kv, probs[0]) if need_probs else (x, kv)


class Layers(nnx.Module):
    """L blocks: lax.scan over stacked parameters, or an unrolled loop over L separate blocks.

    Both layouts hold the same numbers. ``scan_layers=True`` stores every block parameter with a
    leading L axis ("layers") and compiles one block; ``scan_layers=False`` keeps L blocks, so each
    weight feeds its matmul directly (slicing a stacked weight inside a loop makes XLA copy it,
    which on CPU doubles the memory traffic of a decode step). Checkpoints always hold the stacked
    layout; ``stack_layers`` / ``unstack_layers`` convert.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.n_layers = cfg.n_layers
        self.scan = cfg.scan_layers
        self.remat = cfg.remat
        self.sliding = tuple(w is not None for w in cfg.layer_windows)  # which layers take the window mask

        @nnx.split_rngs(splits=cfg.n_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, axis_size=cfg.n_layers,
                  transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make(r):
            return Block(cfg, rngs=r)

        stacked = make(rngs)
        if self.scan:
            self.blocks = stacked
        else:  # the same initial values, one block per layer
            values = nnx.to_pure_dict(nnx.state(stacked, nnx.Param))
            blocks = []
            for i in range(cfg.n_layers):
                block = nnx.eval_shape(lambda: Block(cfg, rngs=nnx.Rngs(0)))
                state = nnx.state(block, nnx.Param)
                nnx.replace_by_pure_dict(state, jax.tree.map(lambda a: a[i], values))
                nnx.update(block, state)
                blocks.append(block)
            self.blocks = nnx.List(blocks)

    def __call__(self, x, masks, positions, *, cache=None, cache_index=None, key=None, need_probs=False):
        """x: [B, T, D]; masks: (mask, sliding-window mask or None), each [B, 1, T, S]: a layer
        whose type is "sliding" takes the second when there is one; cache: None or ``init_cache``'s
        layout. Returns (x, updated cache).

        Unrolled, the cache holds one buffer per layer ({"k": (L x [B, K, S, Dh]), "v": ...}) that
        each layer writes then reads, so XLA updates it in place; scanned, it is stacked
        ({"k": [L, B, K, S, Dh], ...}) and rides in the scan carry. ``need_probs`` adds a third
        output: every layer's attention probabilities [L, B, H, T, S].
        """
        keys = [None] * self.n_layers if key is None else list(jax.random.split(key, self.n_layers))
        full, sliding = masks

        def run(block, h, mask, layer_kv, layer_key):
            return block(h, mask, positions, kv_cache=layer_kv, cache_index=cache_index, key=layer_key,
                         need_probs=need_probs)

        if not self.scan:
            step = jax.checkpoint(run, prevent_cse=False) if self.remat else run
            ks, vs, maps = [], [], []
            for i, block in enumerate(self.blocks):
                mask = sliding if sliding is not None and self.sliding[i] else full
                x, kv, *probs = step(block, x, mask, None if cache is None else (cache["k"][i], cache["v"][i]), keys[i])
                maps += probs
                if kv is not None:
                    ks.append(kv[0])
                    vs.append(kv[1])
            out = (x, (None if cache is None else {"k": tuple(ks), "v": tuple(vs)}))
            return (*out, jnp.stack(maps)) if need_probs else out

        graphdef, state = nnx.split(self.blocks)

        def body(carry, xs):
            h, kc, vc = carry
            layer_state, i, layer_key, layer_sliding = xs
            mask = full if sliding is None else jnp.where(layer_sliding, sliding, full)
            layer_kv = None if kc is None else (jax.lax.dynamic_index_in_dim(kc, i, keepdims=False),
                                                jax.lax.dynamic_index_in_dim(vc, i, keepdims=False))
            h, kv, *probs = run(nnx.merge(graphdef, layer_state), h, mask, layer_kv, layer_key)
            if kv is not None:
                kc = jax.lax.dynamic_update_index_in_dim(kc, kv[0], i, 0)
                vc = jax.lax.dynamic_update_index_in_dim(vc, kv[1], i, 0)
            return (h, kc, vc), (probs[0] if probs else None)

        if self.remat:
            body = jax.checkpoint(body)
        carry = (x, None, None) if cache is None else (x, cache["k"], cache["v"])
        xs = (state, jnp.arange(self.n_layers), None if key is None else jax.random.split(key, self.n_layers),
              jnp.asarray(self.sliding))
        (x, kc, vc), maps = jax.lax.scan(body, carry, xs)
        out = (x, (None if cache is None else {"k": kc, "v": vc}))
        return (*out, maps) if need_probs else out


def stack_layers(params: dict) -> dict:
    """Params with per-layer blocks ({0: ..., 1: ...}) -> the stacked (checkpoint) layout."""
    blocks = params["layers"]["blocks"]
    if not all(isinstance(k, int) for k in blocks):
        return params
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *[blocks[i] for i in sorted(blocks)])
    return {**params, "layers": {**params["layers"], "blocks": stacked}}


def unstack_layers(params: dict, n_layers: int) -> dict:
    """Stacked params -> one block per layer ({0: ..., 1: ...}), for scan_layers=False."""
    blocks = params["layers"]["blocks"]
    if all(isinstance(k, int) for k in blocks):
        return params
    def layer(a, i):  # arrays, or ShapeDtypeStructs (abstract params)
        return jax.ShapeDtypeStruct(a.shape[1:], a.dtype) if isinstance(a, jax.ShapeDtypeStruct) else a[i]

    per_layer = {i: jax.tree.map(lambda a: layer(a, i), blocks) for i in range(n_layers)}
    return {**params, "layers": {**params["layers"], "blocks": per_layer}}


def params_for(cfg: ModelConfig, params: dict) -> dict:
    """``params`` (either layout) in the layout ``cfg.scan_layers`` asks for."""
    return stack_layers(params) if cfg.scan_layers else unstack_layers(params, cfg.n_layers)


class Embeddings(nnx.Module):
    """Token (+ learned or sinusoidal position) (+ token type) embeddings, optional norm, dropout."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        dtype = jnp.dtype(cfg.dtype)
        self.kind = cfg.positions
        self.max_len = cfg.max_len
        self.d_model = cfg.d_model
        self.scale = math.sqrt(cfg.d_model) if cfg.embed_scale else None
        self.dropout = cfg.dropout
        q = cfg.quantize
        self.tokens = Embed(cfg.vocab_size, cfg.d_model, ("vocab", "embed"), std=cfg.init_std,
                            dtype=dtype, rngs=rngs, quantize=q)
        self.positions = (Embed(cfg.max_len, cfg.d_model, (None, "embed"), std=cfg.init_std,
                                dtype=dtype, rngs=rngs, quantize=q) if cfg.positions == "learned" else None)
        self.types = (Embed(cfg.type_vocab_size, cfg.d_model, (None, "embed"), std=cfg.init_std,
                            dtype=dtype, rngs=rngs, quantize=q) if cfg.type_vocab_size else None)
        self.norm = _norm(cfg) if cfg.embed_norm else None

    def __call__(self, ids, positions, token_type_ids=None, key=None):
        x = self.tokens(ids)
        if self.scale is not None:  # in the compute dtype, as Gemma rounds it
            x = x * jnp.asarray(self.scale, x.dtype)
        if self.positions is not None:
            x = x + self.positions(positions)
        elif self.kind == "sinusoidal":
            x = x + jnp.take(sinusoidal_positions(self.max_len, self.d_model), positions, axis=0).astype(x.dtype)
        if self.types is not None:
            x = x + self.types(jnp.zeros_like(ids) if token_type_ids is None else token_type_ids)
        if self.norm is not None:
            x = self.norm(x)
        return dropout(x, self.dropout, key)


def positions_from_mask(attention_mask):
    """Position ids [B, T] that count real tokens only, so left padding does not shift them."""
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


def positions_from_segments(segment_ids):
    """Position ids [B, T] that restart at 0 where each segment (packed example) begins."""
    b, t = segment_ids.shape
    idx = jnp.broadcast_to(jnp.arange(t), (b, t))
    first = jnp.concatenate([jnp.ones((b, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    return idx - jax.lax.cummax(jnp.where(first, idx, 0), axis=1)


class Transformer(nnx.Module):
    """Embeddings -> L blocks -> optional final norm. Subclasses add heads."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        self.embed = Embeddings(cfg, rngs=rngs)
        self.layers = Layers(cfg, rngs=rngs)
        self.final_norm = _norm(cfg) if cfg.final_norm else None
        # Prompt tuning (Lester et al. 2021): P trainable vectors before every input, at positions
        # 0..P-1; the text follows at positions P...; outputs at the prompt positions are dropped.
        self.prompt = (param(rngs.params(), (cfg.prompt_length, cfg.d_model), (None, "embed"), std=cfg.init_std)
                       if cfg.prompt_length else None)

    def masks(self, key_valid, query_slots=None, segment_ids=None):
        """(mask, sliding-window mask or None) for ``Layers``: the second only when some layers
        slide and others do not; when all slide, the first is the windowed one."""
        cfg = self.config
        windows = set(cfg.layer_windows)
        window = cfg.sliding_window if cfg.causal and windows != {None} else None
        mask = make_mask(key_valid, query_slots, causal=cfg.causal, window=window if None not in windows else None,
                         segment_ids=segment_ids)
        if window is None or None not in windows:
            return mask, None
        return mask, make_mask(key_valid, query_slots, causal=True, window=window, segment_ids=segment_ids)

    def with_prompt(self, x, attention_mask, positions):
        """Prepend the soft prompt to embedded inputs x [B, T, D]: (x, mask, positions) of P + T."""
        if self.prompt is None:
            return x, attention_mask, positions
        b, p = x.shape[0], self.prompt.shape[0]
        prompt = jnp.broadcast_to(self.prompt[...].astype(x.dtype), (b, *self.prompt.shape))
        return (jnp.concatenate([prompt, x], axis=1),
                jnp.concatenate([jnp.ones((b, p), bool), attention_mask], axis=1),
                jnp.concatenate([jnp.broadcast_to(jnp.arange(p), (b, p)), positions], axis=1))

    def hidden_states(self, input_ids, attention_mask=None, token_type_ids=None, *, key=None, need_probs=False,
                      segment_ids=None):
        """Final hidden states [B, T, D] (HF's last_hidden_state). ``key`` enables dropout;
        ``need_probs`` returns (hidden states, attention probabilities [L, B, H, T, T]).
        ``segment_ids`` [B, T] (packed examples, 0 = padding): positions restart at every segment
        and no token attends to another segment's, so each example runs as if alone."""
        b, t = input_ids.shape
        p = self.config.prompt_length
        if segment_ids is not None:
            if p:
                raise ValueError("packed examples (segment ids) cannot share a soft prompt; use data.packing=pad")
            attention_mask = segment_ids > 0
            positions = positions_from_segments(segment_ids)
        else:
            attention_mask = jnp.ones((b, t), bool) if attention_mask is None else attention_mask.astype(bool)
            positions = positions_from_mask(attention_mask) + p
        k_embed, k_layers = _split(key, 2)
        x = self.embed(input_ids, positions, token_type_ids, k_embed)
        x, attention_mask, positions = self.with_prompt(x, attention_mask, positions)
        x, _, *maps = self.layers(x, self.masks(attention_mask, segment_ids=segment_ids), positions, key=k_layers,
                                  need_probs=need_probs)
        x = x[:, p:]
        x = self.final_norm(x) if self.final_norm is not None else x
        return (x, maps[0]) if need_probs else x

    def attention_maps(self, input_ids, attention_mask=None, token_type_ids=None):
        """Every layer's attention probabilities [L, B, H, T, T] (rows of padded keys are 0)."""
        return self.hidden_states(input_ids, attention_mask, token_type_ids, need_probs=True)[1]


class Decoder(Transformer):
    """Causal LM (GPT-2): tied (or separate) LM head over the final hidden states."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        super().__init__(cfg, rngs=rngs)
        self.lm_head = (None if cfg.tie_embeddings else
                        Dense("btd,dv->btv", (cfg.d_model, cfg.vocab_size), ("embed", "vocab"),
                              use_bias=False, std=cfg.init_std, dtype=jnp.dtype(cfg.dtype), rngs=rngs,
                              quantize=cfg.quantize))
        self.dropout = cfg.dropout
        self.softcap = cfg.final_softcap
        # head="classify": a linear layer on the hidden state of each row's last real token.
        self.classifier = (Dense("bd,dc->bc", (cfg.d_model, cfg.num_labels), ("embed", None), use_bias=True,
                                 std=cfg.init_std, dtype=jnp.dtype(cfg.dtype), rngs=rngs, quantize=cfg.quantize)
                           if cfg.head == "classify" else None)

    def head(self, h):
        """Next-token logits [B, T, V] in float32 (soft-capped when final_softcap is set)."""
        logits = self.embed.tokens.attend(h) if self.lm_head is None else self.lm_head(h)
        logits = logits.astype(jnp.float32)
        if self.softcap is not None:
            logits = self.softcap * jnp.tanh(logits / self.softcap)
        return logits

    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, *, key=None, segment_ids=None):
        """[B, T, V] next-token logits; [B, C] class logits for head="classify"."""
        if self.classifier is None:
            return self.head(self.hidden_states(input_ids, attention_mask, token_type_ids, key=key,
                                                segment_ids=segment_ids))
        k_body, k_head = _split(key, 2)
        h = self.hidden_states(input_ids, attention_mask, token_type_ids, key=k_body)
        b, t = input_ids.shape
        valid = jnp.ones((b, t), bool) if attention_mask is None else attention_mask.astype(bool)
        last = t - 1 - jnp.argmax(valid[:, ::-1], axis=1)  # the last real token (left or right padding)
        pooled = jnp.take_along_axis(h, last[:, None, None], axis=1)[:, 0]
        return self.classifier(dropout(pooled, self.dropout, k_head)).astype(jnp.float32)

    def decode(self, input_ids, positions, cache, cache_index, key_valid, *, prefill: bool = False):
        """One prefill or decode step over the KV cache.

        input_ids, positions: [B, T], written to cache slots cache_index .. cache_index + T - 1
        (``cache_index``: an int, or one per row [B] when rows sit at different lengths);
        cache: ``generate.init_cache``'s layout; key_valid: [B, S] (False for padding slots).
        ``prefill`` with a soft prompt: the prompt goes first (slots 0..P-1, cache_index 0) and
        positions count from P. Returns (final hidden states [B, T, D], updated cache); ``head``
        turns them into logits.
        """
        x = self.embed(input_ids, positions)
        p = self.config.prompt_length if prefill else 0
        if p:
            x, _, positions = self.with_prompt(x, jnp.ones(input_ids.shape, bool), positions)
        b, t = x.shape[:2]
        slots = jnp.broadcast_to(jnp.reshape(cache_index, (-1, 1)) + jnp.arange(t), (b, t))
        x, cache = self.layers(x, self.masks(key_valid, slots), positions, cache=cache, cache_index=cache_index)
        x = x[:, p:]
        return (self.final_norm(x) if self.final_norm is not None else x), cache


class MLMHead(nnx.Module):
    """BERT's MLM head: dense + activation + norm, then the (tied) decoder plus a vocab bias."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        dtype = jnp.dtype(cfg.dtype)
        self.act = ACTIVATIONS[cfg.activation]
        self.transform = Dense("btd,de->bte", (cfg.d_model, cfg.d_model), ("embed", "mlp"),
                               use_bias=True, std=cfg.init_std, dtype=dtype, rngs=rngs, quantize=cfg.quantize)
        self.norm = Norm(cfg.d_model, cfg.norm, cfg.norm_eps)
        self.decoder = (None if cfg.tie_embeddings else
                        Dense("btd,dv->btv", (cfg.d_model, cfg.vocab_size), ("embed", "vocab"),
                              use_bias=False, std=cfg.init_std, dtype=dtype, rngs=rngs, quantize=cfg.quantize))
        self.bias = param(None, (cfg.vocab_size,), ("vocab",), "zeros")

    def __call__(self, h, tokens: Embed):
        t = self.norm(self.act(self.transform(h)))
        logits = tokens.attend(t) if self.decoder is None else self.decoder(t)
        return (logits + self.bias[...]).astype(jnp.float32)


class Encoder(Transformer):
    """Bidirectional encoder (BERT) with optional pooler and an MLM or classification head."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        super().__init__(cfg, rngs=rngs)
        dense = dict(use_bias=True, std=cfg.init_std, dtype=jnp.dtype(cfg.dtype), rngs=rngs, quantize=cfg.quantize)
        self.head_kind = cfg.head
        self.dropout = cfg.dropout
        self.pooler = Dense("bd,de->be", (cfg.d_model, cfg.d_model), ("embed", "mlp"), **dense) if cfg.pooler else None
        self.mlm = MLMHead(cfg, rngs=rngs) if cfg.head == "mlm" else None
        self.classifier = (Dense("bd,dc->bc", (cfg.d_model, cfg.num_labels), ("embed", None), **dense)
                           if cfg.head == "classify" else None)

    def pooled(self, h):
        """tanh(dense(h[:, 0])): [B, D] summary of the first ([CLS]) token."""
        return jnp.tanh(self.pooler(h[:, 0]))

    def head(self, h, key=None):
        """MLM logits [B, T, V] or classification logits [B, C], float32."""
        if self.head_kind == "mlm":
            return self.mlm(h, self.embed.tokens)
        if self.head_kind == "classify":
            return self.classifier(dropout(self.pooled(h), self.dropout, key)).astype(jnp.float32)
        raise ValueError("this model has no output head (head='none'); use hidden_states()")

    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, *, key=None, segment_ids=None):
        k_body, k_head = _split(key, 2)
        return self.head(self.hidden_states(input_ids, attention_mask, token_type_ids, key=k_body,
                                            segment_ids=segment_ids), k_head)


def build_model(cfg: ModelConfig, seed: int = 0) -> Transformer:
    """A freshly initialised model (Decoder or Encoder by ``cfg.arch``)."""
    cls = Decoder if cfg.causal else Encoder
    return cls(cfg, rngs=nnx.Rngs(seed))


def abstract_model(cfg: ModelConfig) -> Transformer:
    """The model with ShapeDtypeStruct leaves: shapes and logical axes, no memory.

    Traced once per config (40-500 ms: every layer's initialisers) and then copied (~1-5 ms):
    loading, training setup and export each ask for it several times.
    """
    return nnx.merge(*_abstract_split(cfg), copy=True)  # fresh Variables: callers may fill them in


def model_graphdef(cfg: ModelConfig) -> nnx.GraphDef:
    """The model's structure (a static argument of jitted functions), from abstract_model's cache."""
    return _abstract_split(cfg)[0]


@functools.lru_cache(maxsize=32)  # a ModelConfig is frozen and hashable (jit hashes it in the graphdef too)
def _abstract_split(cfg: ModelConfig):
    return nnx.split(nnx.eval_shape(lambda: build_model(cfg)))


def abstract_params(cfg: ModelConfig) -> dict:
    """The stacked (checkpoint) parameter tree as a pure dict of ShapeDtypeStructs."""
    return nnx.to_pure_dict(nnx.state(abstract_model(cfg.replace(scan_layers=True)), nnx.Param))
