"""Losses, the pure jitted train / eval steps, and the training loop.

Dimension legend: B batch rows, M micro-batches, T length, V vocab.

``train_step(state, batch) -> (state, metrics)`` is pure and jitted once with the state donated.
Randomness is explicit: the step's key is fold_in(seed, step), so a resumed run draws exactly the
dropout and MLM masks the uninterrupted run would have.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxlm.compress import tree
from jaxlm.compress.lora import is_adapter
from jaxlm.compress.prune import apply_masks
from jaxlm.config import Config
from jaxlm.optim import make_optimizer, schedule
from jaxlm.sharding import (batch_sharding, check_batch_fits, check_model_fits, like_params, make_mesh,
                            param_shardings)
from jaxlm.transformer import abstract_model, build_model


class TrainingError(RuntimeError):
    """A run that cannot continue (e.g. the loss became NaN); the message names the step."""


# Objectives -------------------------------------------------------------------------------------

def mlm_inputs(tokens, key, *, vocab_size: int, mask_id: int, prob: float, special_ids=()):
    """BERT masking: select ``prob`` of the non-special tokens; of those 80% -> mask_id, 10% -> a
    random token, 10% unchanged. Returns (inputs, selected [B, T] bool)."""
    k_sel, k_kind, k_rand = jax.random.split(key, 3)
    special = jnp.zeros(tokens.shape, bool)
    for s in special_ids:
        special = special | (tokens == s)
    selected = jax.random.bernoulli(k_sel, prob, tokens.shape) & ~special
    kind = jax.random.uniform(k_kind, tokens.shape)
    random_tokens = jax.random.randint(k_rand, tokens.shape, 0, vocab_size)
    inputs = jnp.where(selected & (kind < 0.8), mask_id, tokens)
    inputs = jnp.where(selected & (kind >= 0.8) & (kind < 0.9), random_tokens, inputs)
    return inputs, selected


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """Static settings of the jitted steps."""

    objective: str
    grad_accum: int = 1
    seed: int = 0
    mask_id: int | None = None
    special_ids: tuple = ()
    mlm_prob: float = 0.15
    # objective=distill (see jaxlm/compress/distill.py)
    temperature: float = 2.0
    alpha: float = 0.5
    attention_weight: float = 0.0
    layer_pairs: tuple = ()


def loss_sums(model, rows, spec: StepSpec, *, key=None, mask_key=None, teacher=None):
    """(sum of token losses, number of scored tokens, number predicted right) for rows [B, T + 1].

    ``key`` turns dropout on; ``mask_key`` draws the MLM masks. The token loss is the NLL of the
    true token, or with ``teacher`` (a model, objective=distill) the distillation loss; the
    attention term is added as its mean times the number of scored tokens.
    """
    if spec.objective == "classify":  # rows: {"ids", "mask": [B, T], "label": [B]}
        logits = model(rows["ids"], rows["mask"], key=key)  # [B, C]
        target_logit = jnp.take_along_axis(logits, rows["label"][:, None], axis=-1)[:, 0]
        nll = jax.nn.logsumexp(logits, axis=-1) - target_logit
        correct = (target_logit >= jax.lax.stop_gradient(logits.max(-1))).astype(jnp.float32)
        return nll.sum(), jnp.float32(nll.shape[0]), correct.sum()
    causal = spec.objective == "clm" or (spec.objective == "distill" and model.config.causal)
    if causal:
        inputs, targets = rows[:, :-1], rows[:, 1:]
        weights = jnp.ones(targets.shape, jnp.float32)
    else:
        targets = rows[:, :-1]
        inputs, selected = mlm_inputs(targets, mask_key, vocab_size=model.config.vocab_size,
                                      mask_id=spec.mask_id, prob=spec.mlm_prob, special_ids=spec.special_ids)
        weights = selected.astype(jnp.float32)
    extra = 0.0
    if teacher is None:
        logits = model(inputs, key=key)
        # nll = logsumexp - target logit (argmax is slow on CPU: "correct" compares with the max).
        target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
        per_token = jax.nn.logsumexp(logits, axis=-1) - target_logit
    else:
        from jaxlm.compress import distill

        if spec.attention_weight > 0:
            h, maps = model.hidden_states(inputs, key=key, need_probs=True)
            t_h, t_maps = teacher.hidden_states(inputs, need_probs=True)
            extra = spec.attention_weight * distill.attention_mse(maps, t_maps, spec.layer_pairs) * weights.sum()
        else:
            h, t_h = model.hidden_states(inputs, key=key), teacher.hidden_states(inputs)
        logits = model.head(h)
        per_token = distill.token_losses(logits, teacher.head(t_h), targets, temperature=spec.temperature,
                                         alpha=spec.alpha)
        target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    correct = (target_logit >= jax.lax.stop_gradient(logits.max(-1))).astype(jnp.float32)
    return (per_token * weights).sum() + extra, weights.sum(), (correct * weights).sum()


# Steps ------------------------------------------------------------------------------------------

def make_train_step(graphdef, tx, spec: StepSpec, lr_fn, *, dropout: bool = True, state_sharding=None,
                    teacher_graphdef=None):
    """``train_step(state, batch) -> (state, metrics)``; batch: [B, T + 1] int32; donated state.

    ``state_sharding`` (a tree like the state) pins the output layout on a mesh.
    """

    def step(state, batch, frozen=None, masks=None, teacher_params=None):
        """``frozen``: parameters that take part in the model but are not trained (e.g. the base
        under LoRA adapters); ``masks``: pruning masks, re-applied after every update;
        ``teacher_params``: the teacher's (objective=distill), never differentiated."""
        teacher = None if teacher_params is None else nnx.merge(teacher_graphdef, teacher_params)

        def loss_fn(params, rows, key):
            k_drop, k_mask = jax.random.split(key)
            full = params if frozen is None else tree.merge(params, frozen)
            s, n, c = loss_sums(nnx.merge(graphdef, full), rows, spec, key=k_drop if dropout else None,
                                mask_key=k_mask, teacher=teacher)
            return s, (n, c)

        params, opt_state, step = state["params"], state["opt_state"], state["step"]
        key = jax.random.fold_in(jax.random.key(spec.seed), step)
        micro = jax.tree.map(lambda x: x.reshape(spec.grad_accum, -1, *x.shape[1:]), batch)  # [M, B / M, ...]

        def accumulate(carry, xs):
            g_sum, l_sum, n_sum, c_sum = carry
            rows, i = xs
            (l, (n, c)), g = jax.value_and_grad(loss_fn, has_aux=True)(params, rows, jax.random.fold_in(key, i))
            return (jax.tree.map(jnp.add, g_sum, g), l_sum + l, n_sum + n, c_sum + c), None

        if spec.grad_accum == 1:  # no zero-filled accumulator: one less pass over the gradients
            (l, (n, c)), g = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, jax.random.fold_in(key, 0))
        else:
            zeros = jax.tree.map(jnp.zeros_like, params)
            (g, l, n, c), _ = jax.lax.scan(accumulate, (zeros, 0.0, 0.0, 0.0),
                                           (micro, jnp.arange(spec.grad_accum)))
        # Sums over all micro-batches, divided once: the same as one big batch.
        n = jnp.maximum(n, 1.0)
        grads = jax.tree.map(lambda x: x / n, g)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        if masks is not None:
            params = apply_masks(params, masks)
        metrics = {"loss": l / n, "accuracy": c / n, "grad_norm": optax.global_norm(grads), "lr": lr_fn(step)}
        return {"params": params, "opt_state": opt_state, "step": step + 1}, metrics

    out = None if state_sharding is None else (state_sharding, None)
    return jax.jit(step, donate_argnums=0, out_shardings=out)


def make_eval_step(graphdef, spec: StepSpec):
    """``eval_step(params, batch, index) -> (nll sum, count, correct)``; no dropout, fixed MLM masks."""

    def step(params, batch, index):
        mask_key = jax.random.fold_in(jax.random.key(spec.seed + 1), index)
        model = nnx.merge(graphdef, params)
        if spec.objective == "classify":  # also a confusion matrix [true, predicted] for macro-F1
            c = model.config.num_labels
            pred = jnp.argmax(model(batch["ids"], batch["mask"]), axis=-1)
            confusion = jax.nn.one_hot(batch["label"], c).T @ jax.nn.one_hot(pred, c)
            return (*loss_sums(model, batch, spec), confusion)
        return loss_sums(model, batch, spec, mask_key=mask_key)

    return jax.jit(step)


def flops_per_token(cfg, seq_len: int) -> float:
    """Training FLOPs per token: 6N (N non-embedding parameters) + 12 * L * D * T attention."""
    d, L = cfg.d_model, cfg.n_layers
    n = L * (2 * d * cfg.n_heads * cfg.dim_per_head + 2 * d * cfg.kv_heads * cfg.dim_per_head
             + 2 * d * cfg.mlp_dim)
    return 6 * n + 12 * L * d * seq_len


PEAK_TFLOPS_BF16 = {"TPU v4": 275, "TPU v5 lite": 197, "TPU v5e": 197, "TPU v5p": 459, "TPU v6e": 918,
                    "TPU v6 lite": 918, "A100": 312, "H100": 989, "H200": 989}


def peak_flops(device) -> float | None:
    kind = getattr(device, "device_kind", "")
    for name, tflops in PEAK_TFLOPS_BF16.items():
        if name.lower() in kind.lower():
            return tflops * 1e12
    return None


# The loop ---------------------------------------------------------------------------------------

def _tokenizer(data_cfg):
    from jaxlm.tokenizer import ByteTokenizer, load_tokenizer

    if data_cfg.tokenizer == "byte":
        tok = ByteTokenizer()
    else:
        tok = load_tokenizer(data_cfg.tokenizer)
        if tok is None:
            raise ValueError(f"data.tokenizer={data_cfg.tokenizer}: no tokenizer files found there")
    return tok, tokenizer_tag(tok)


def check_seq_len(seq_len: int, max_len: int) -> None:
    if seq_len > max_len:
        raise ValueError(f"data.seq_len={seq_len} exceeds the model's context of {max_len} tokens "
                         "(model.max_len, less model.prompt_length with a soft prompt)")


def tokenizer_tag(tok) -> str:
    """A short name of a tokenizer for the token cache: 'byte', or a digest of its files."""
    import hashlib

    files = getattr(tok, "_files", None)
    if files is None:
        return "byte"
    h = hashlib.sha1()
    for name in sorted(files):
        h.update(name.encode() + files[name])
    return "hf" + h.hexdigest()[:12]


def _rows(cfg: Config, split: str, tokenizer, tok_tag: str, log):
    from jaxlm.data import DEFAULT_DATA_DIR, PackedRows, text_source, token_stream

    source, name = text_source(cfg.data, split)
    cache = Path(cfg.data.data_dir or DEFAULT_DATA_DIR) / "tokens"
    stream = token_stream(source, tokenizer, cache_dir=cache, tag=f"{name}-{split}-{tok_tag}",
                          text_key=cfg.data.text_key, log=log)
    return PackedRows(stream, cfg.data.seq_len)


def trainable_filter(method: str):
    """path -> whether that parameter trains under adapt.method."""
    if method == "lora":
        return is_adapter
    if method == "prompt":
        return lambda path: path == ("prompt",)
    return lambda path: True


def _base_model(cfg: Config, log):
    """The model named by adapt.init, its config adjusted for this run (runtime fields, dropout,
    LoRA adapters), params in the run's layout; None when training from scratch."""
    if not cfg.adapt.init:
        if cfg.adapt.method != "full":
            raise ValueError(f"adapt.method={cfg.adapt.method} needs a pretrained model: set adapt.init=PATH")
        return None
    from jaxlm.api import load

    base = load(cfg.adapt.init, scan_layers=cfg.model.scan_layers)
    config = base.config.replace(**{f: getattr(cfg.model, f) for f in (
        "dropout", "attention_dropout", "scan_layers", "remat", "attention_impl")})
    if cfg.adapt.method == "prompt":
        if config.prompt_length:
            raise ValueError(f"{cfg.adapt.init} has a soft prompt already")
        config = config.replace(prompt_length=cfg.adapt.prompt_length)
    if cfg.adapt.method == "lora":
        if config.lora_rank:
            raise ValueError(f"{cfg.adapt.init} has LoRA adapters already; export it merged first (jaxlm export)")
        config = config.replace(lora_rank=cfg.adapt.lora_rank, lora_alpha=cfg.adapt.lora_alpha,
                                lora_targets=cfg.adapt.lora_targets)
    if cfg.prune.sparsity and cfg.adapt.method != "full":
        raise ValueError("prune.sparsity needs adapt.method=full (the pruned weights must be trainable)")
    base.config = config
    log(f"starting from {cfg.adapt.init} ({config.name}, {cfg.adapt.method} fine-tuning)")
    return base


def _teacher(cfg: Config, mesh, log):
    """(graphdef, params on the mesh, layer pairs) of distill.teacher, checked against the student."""
    from jaxlm.api import load
    from jaxlm.compress.distill import check_teacher, layer_pairs

    if not cfg.distill.teacher:
        raise ValueError("train.objective=distill needs distill.teacher=PATH (any model jaxlm.load accepts)")
    lm = load(cfg.distill.teacher)
    check_teacher(cfg.model, lm.config)
    t_cfg = lm.config.replace(dtype=cfg.train.dtype)
    check_model_fits(t_cfg, mesh)
    pairs = layer_pairs(cfg.model.n_layers, t_cfg.n_layers, cfg.distill.layer_map)
    log(f"distilling from {cfg.distill.teacher} ({t_cfg.n_layers} layers, d={t_cfg.d_model}): T="
        f"{cfg.distill.temperature}, alpha={cfg.distill.alpha}, attention weight {cfg.distill.attention_weight}")
    return (nnx.graphdef(abstract_model(t_cfg)), jax.device_put(lm.params, param_shardings(t_cfg, mesh)), pairs)


class _Pruner:
    """Magnitude masks on the schedule of ``prune.*``; recomputed from the current weights each
    time the scheduled sparsity changes (and on resume, where the zeros give the same masks)."""

    def __init__(self, pc, log):
        from jaxlm.compress.prune import check_sparsity

        check_sparsity(pc.sparsity)
        if jax.process_count() > 1:  # masks are computed on the host from the gathered weights
            raise ValueError("prune.sparsity works in single-process runs (one host, any number of devices)")
        self.pc, self.log = pc, log

    def level(self, step: int) -> float:
        from jaxlm.compress.prune import sparsity_at

        pc = self.pc
        if step < pc.start:
            return 0.0
        if pc.end <= pc.start:
            return pc.sparsity
        last = pc.start + ((min(step, pc.end) - pc.start) // pc.every) * pc.every
        return sparsity_at(pc.end if step >= pc.end else last, final=pc.sparsity, start=pc.start, end=pc.end)

    def changes_at(self, step: int) -> bool:
        return step >= self.pc.start and self.level(step) != self.level(step - 1)

    def masks_for(self, step: int, state):
        from jaxlm.compress.prune import magnitude_masks

        level = self.level(step)
        if level == 0:
            return None
        masks = magnitude_masks(state["params"], level, scope=self.pc.scope)
        masks = jax.tree.map(lambda m, p: jax.device_put(m, p.sharding), masks,
                             _like(masks, state["params"]))
        state["params"] = apply_masks(state["params"], masks)
        self.log(f"step {step}: pruned to sparsity {level:.3f}")
        return masks


def _like(masks, params):
    """The leaves of ``params`` at the paths of ``masks``."""
    return {k: _like(v, params[k]) if isinstance(v, dict) else params[k] for k, v in masks.items()}


def _check_compatible(saved: dict, cfg: Config, workdir) -> None:
    from jaxlm.config import ModelConfig

    old = ModelConfig.from_dict(saved["model"])
    shape = ("arch", "vocab_size", "max_len", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim",
             "d_ff", "norm", "positions", "type_vocab_size", "use_bias", "tie_embeddings", "head", "pooler",
             "lora_rank", "lora_targets", "factor_rank", "factor_targets", "quantize",
             "scan_layers")  # the last: the layout of the saved params and optimizer state
    for f in shape:
        if getattr(old, f) != getattr(cfg.model, f):
            raise ValueError(f"{workdir} holds a checkpoint of a different model (model.{f}: "
                             f"{getattr(old, f)!r} there, {getattr(cfg.model, f)!r} now); "
                             "use another train.workdir")


class _Progress:
    """One status line on stderr: step, loss, lr, tokens/s, GFLOP/s or MFU, ETA."""

    def __init__(self, total, tokens_per_step, flops_per_step, start_step, log):
        self.total, self.tps, self.fps, self.log = total, tokens_per_step, flops_per_step, log
        self.t0, self.s0 = time.perf_counter(), start_step
        self.peak = peak_flops(jax.devices()[0])

    def line(self, step, m) -> str:
        dt = max(time.perf_counter() - self.t0, 1e-9)
        rate = (step - self.s0) / dt
        eta = (self.total - step) / rate if rate > 0 else float("nan")
        flops = self.fps * rate
        util = (f"MFU {100 * flops / (self.peak * jax.device_count()):.1f}%" if self.peak
                else f"{flops / 1e9:.1f} GFLOP/s")
        return (f"step {step}/{self.total} | loss {m['loss']:.4f} | lr {m['lr']:.2e} | "
                f"{self.tps * rate:,.0f} tok/s | {util} | ETA {eta:.0f}s")


def train(cfg: Config, *, log=None) -> dict:
    """Run (or resume) training as ``cfg`` says; returns the last metrics. Writes ``train.workdir``."""
    from jaxlm.checkpoint import TrainCheckpoints
    from jaxlm.data import loader

    pi, pc = jax.process_index(), jax.process_count()
    if pi != 0:  # in a multi-host run only process 0 reports; errors still raise everywhere
        log = lambda msg: None  # noqa: E731
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    t_start = time.perf_counter()
    workdir = Path(cfg.train.workdir)
    base = _base_model(cfg, log)  # adapt.init: the pretrained model to start from (else None)
    if base is not None:
        cfg = dataclasses.replace(cfg, model=base.config)
    tokenizer, tok_tag = _tokenizer(cfg.data) if base is None or base.tokenizer is None else \
        (base.tokenizer, tokenizer_tag(base.tokenizer))
    # The tokenizer the model is trained with decides its special ids (generation stops at its EOS).
    cfg = dataclasses.replace(cfg, model=cfg.model.replace(
        eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id,
        bos_token_id=cfg.model.bos_token_id if tokenizer.eos_id is None else tokenizer.eos_id))
    class_rows = None
    if cfg.train.objective == "classify":
        from jaxlm.classify import ClassRows, label_names, read_examples

        train_ex = read_examples(cfg.data, "train")
        names = label_names(train_ex)
        cfg = dataclasses.replace(cfg, model=cfg.model.replace(
            head="classify", num_labels=len(names), label_names=names, pooler=cfg.model.pooler or not cfg.model.causal))
        class_rows = tuple(ClassRows(ex, tokenizer, names, cfg.data.seq_len)
                           for ex in (train_ex, read_examples(cfg.data, "validation")))
        log(f"classes: {', '.join(names)}; {len(class_rows[0])} training and {len(class_rows[1])} validation examples")
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size="
                         f"{cfg.model.vocab_size}; set model.vocab_size={tokenizer.vocab_size}")
    check_seq_len(cfg.data.seq_len, cfg.model.context)
    if cfg.data.batch_size % cfg.optim.grad_accum:
        raise ValueError(f"data.batch_size={cfg.data.batch_size} is not divisible by optim.grad_accum="
                         f"{cfg.optim.grad_accum}")
    mask_id = getattr(tokenizer, "mask_id", None)
    if (cfg.train.objective == "mlm" or (cfg.train.objective == "distill" and not cfg.model.causal)) \
            and mask_id is None:
        raise ValueError(f"train.objective={cfg.train.objective} on an encoder needs a tokenizer with a mask token")
    specials = tuple(i for i in (tokenizer.eos_id, tokenizer.pad_id, getattr(tokenizer, "cls_id", None))
                     if i is not None)
    # Mesh and shape checks come first: a bad mesh fails in one line, before anything compiles.
    mesh = make_mesh(cfg.mesh)
    check_model_fits(cfg.model, mesh)
    check_batch_fits(cfg.data.batch_size, mesh, cfg.optim.grad_accum)
    teacher = _teacher(cfg, mesh, log) if cfg.train.objective == "distill" else None
    if pc > 1:
        log(f"process {pi} of {pc}: {jax.local_device_count()} local devices, {jax.device_count()} in all; "
            f"mesh data={mesh.shape['data']} fsdp={mesh.shape['fsdp']} tensor={mesh.shape['tensor']}")
    if cfg.train.objective == "classify":
        train_rows, val_rows = class_rows
    else:
        train_rows = _rows(cfg, "train", tokenizer, tok_tag, log)
        val_rows = _rows(cfg, "validation", tokenizer, tok_tag, log)
    it = loader(train_rows, batch_size=cfg.data.batch_size, seed=cfg.train.seed, process_index=pi,
                process_count=pc)

    # model.scan_layers picks the layout of params and optimizer state in this run's checkpoints.
    model_cfg = cfg.model.replace(dtype=cfg.train.dtype)
    graphdef = nnx.graphdef(abstract_model(model_cfg))
    tx = make_optimizer(cfg.optim, cfg.train.steps)
    lr_fn = schedule(cfg.optim, cfg.train.steps)
    # Initialise straight into the mesh layout: the full model never sits on one device.
    p_sharding = param_shardings(model_cfg, mesh)
    init = jax.jit(lambda: nnx.to_pure_dict(nnx.state(build_model(model_cfg, cfg.train.seed), nnx.Param)),
                   out_shardings=p_sharding)
    params = init()
    if base is not None:  # pretrained weights replace the fresh ones (new adapters stay as initialised)
        params = tree.overlay(params, base.params)
        if cfg.adapt.method == "prompt":  # a soft prompt starts as the embeddings of random tokens
            ids = np.random.default_rng(cfg.train.seed).integers(0, model_cfg.vocab_size, model_cfg.prompt_length)
            params["prompt"] = jnp.take(params["embed"]["tokens"]["embedding"], jnp.asarray(ids), axis=0)
        params = jax.device_put(params, p_sharding)
        del base
    # Trainable and frozen parameters: the optimizer and the checkpoints hold the trainable ones.
    trainable = trainable_filter(cfg.adapt.method)
    params, frozen = tree.split(params, trainable)
    p_sharding, _ = tree.split(p_sharding, trainable)
    frozen = frozen or None
    o_sharding = like_params(jax.eval_shape(tx.init, params), p_sharding, mesh)
    opt_state = jax.jit(tx.init, out_shardings=o_sharding)(params)
    rows_sharding = batch_sharding(mesh)

    def to_device(local):  # this host's rows -> one global array (or a dict of them), split over data x fsdp
        return jax.tree.map(lambda x: jax.make_array_from_process_local_data(rows_sharding, np.asarray(x)), local)

    workdir.mkdir(parents=True, exist_ok=True)
    ckpts = TrainCheckpoints(workdir, keep=cfg.train.keep)
    start = 0
    latest = ckpts.latest_step()
    if latest is not None:
        _check_compatible(ckpts.meta(latest)["config"], cfg, workdir)
        try:
            params, opt_state = ckpts.restore(latest, params, opt_state, it)
        except ValueError as e:  # e.g. optim.name or optim.clip_norm changed the optimizer state
            raise ValueError(f"{workdir}/checkpoints/{latest} does not match this run's optimizer state "
                             f"({str(e).splitlines()[0]}); keep the optim settings or use another "
                             "train.workdir") from None
        start = latest
        log(f"resumed from {workdir}/checkpoints/{latest}")
    if pi == 0:
        (workdir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        tokenizer.save(workdir)
    metrics_path = workdir / "metrics.jsonl"
    if pi == 0:
        _truncate_metrics(metrics_path, start)

    dc = cfg.distill
    spec = StepSpec(cfg.train.objective, cfg.optim.grad_accum, cfg.train.seed, mask_id, specials,
                    cfg.train.mlm_prob, dc.temperature, dc.alpha, dc.attention_weight,
                    teacher[2] if teacher else ())
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    train_step = make_train_step(graphdef, tx, spec, lr_fn,
                                 dropout=cfg.model.dropout > 0 or cfg.model.attention_dropout > 0,
                                 state_sharding={"params": p_sharding, "opt_state": o_sharding, "step": replicated},
                                 teacher_graphdef=teacher[0] if teacher else None)
    teacher_params = teacher[1] if teacher else None
    eval_step = make_eval_step(graphdef, spec)
    state = {"params": params, "opt_state": opt_state, "step": jax.device_put(jnp.int32(start), replicated)}
    pruner = _Pruner(cfg.prune, log) if cfg.prune.sparsity else None
    masks = pruner.masks_for(start, state) if pruner else None

    def full_params(params):
        return params if frozen is None else tree.merge(params, frozen)

    def evaluate(params):
        val = loader(val_rows, batch_size=cfg.data.batch_size, seed=0, shuffle=False, process_index=pi,
                     process_count=pc)
        tot, confusion = np.zeros(3), 0
        n = cfg.train.eval_batches if cfg.train.objective != "classify" else len(val_rows) // cfg.data.batch_size
        for i in range(n):
            out = eval_step(params, to_device(next(val)), i)
            tot += np.array([float(x) for x in out[:3]])
            confusion = confusion + (np.asarray(out[3]) if len(out) > 3 else 0)
        metrics = {"val_loss": tot[0] / max(tot[1], 1), "val_accuracy": tot[2] / max(tot[1], 1)}
        if cfg.train.objective == "classify":
            from jaxlm.classify import macro_f1

            metrics["val_macro_f1"] = macro_f1(confusion)
        return metrics

    board = _board(workdir) if pi == 0 else None

    def write(record):
        if pi == 0:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            for k, v in record.items():
                if k != "step":
                    board.add_scalar(k, v, record["step"])

    stop = {"signal": None}
    old_handler = signal.signal(signal.SIGTERM, lambda s, f: stop.update(signal=s))
    tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
    progress = _Progress(cfg.train.steps, tokens_per_step,
                         flops_per_token(cfg.model, cfg.data.seq_len) * tokens_per_step, start, log)
    last = {}
    pending = None  # (step, metrics on device): read one step late so dispatch never waits

    def drain(p):
        s, m = p
        m = {k: float(v) for k, v in m.items()}
        if not math.isfinite(m["loss"]):
            raise TrainingError(f"loss became {m['loss']} at step {s}; stopped. The last good checkpoint "
                                f"is step {ckpts.latest_step()} in {workdir}/checkpoints")
        write({"step": s, **m})
        if s % cfg.train.log_every == 0 or s == cfg.train.steps:
            log(progress.line(s, m))
        return m

    try:
        if start == 0 and cfg.train.eval_every:
            write({"step": 0, **evaluate(full_params(state["params"]))})
        kill_at = int(os.environ.get("JAXLM_TEST_KILL_AFTER_SAVE", "0"))  # fault injection for tests
        for step in range(start + 1, cfg.train.steps + 1):
            batch = to_device(next(it))
            if pruner is not None and pruner.changes_at(step - 1):
                masks = pruner.masks_for(step - 1, state)
            state, metrics = train_step(state, batch, frozen, masks, teacher_params)
            if pending is not None:
                last = drain(pending)
            pending = (step, metrics)
            is_last = step == cfg.train.steps
            if step % cfg.train.save_every == 0 or is_last or stop["signal"]:
                last = drain(pending)  # never checkpoint a state whose loss is not finite
                pending = None
                ckpts.save(step, state["params"], state["opt_state"], it,
                           {"step": step, "config": cfg.to_dict()}, force=True)
                if kill_at == step:
                    ckpts.wait()
                    os.kill(os.getpid(), signal.SIGKILL)
            if cfg.train.eval_every and (step % cfg.train.eval_every == 0 or is_last):
                if pending is not None:
                    last = drain(pending)
                    pending = None
                ev = evaluate(full_params(state["params"]))
                write({"step": step, **ev})
                log(f"step {step}: val_loss {ev['val_loss']:.4f}")
                last.update(ev)
            if stop["signal"]:
                log(f"SIGTERM: saved step {step}; exiting")
                break
        if pending is not None:
            last = drain(pending)
    finally:
        ckpts.wait()
        ckpts.close()
        if board is not None:
            board.close()
        signal.signal(signal.SIGTERM, old_handler)
    log(f"done in {time.perf_counter() - t_start:.0f}s: {workdir}")
    return last


def _board(workdir: Path):
    """TensorBoard event files in WORKDIR/tensorboard (tensorboardX: no TensorFlow needed)."""
    from tensorboardX import SummaryWriter

    return SummaryWriter(str(workdir / "tensorboard"), flush_secs=10)


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop lines past the restored step (they will be logged again, identically)."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)
