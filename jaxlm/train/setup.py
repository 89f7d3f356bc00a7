"""Setting up a training run: everything the loop needs, checked before anything compiles.

``setup(cfg, log) -> Run`` resolves the config (absolute paths, the base model's shape, the
tokenizer's special ids, class labels), checks it, builds the mesh, the data, the sharded state
and the jitted steps, and restores the latest checkpoint of the workdir if there is one.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlm import objectives
from jaxlm.compress import tree
from jaxlm.compress.adapt import adapted_config, trainable
from jaxlm.config import CHECKPOINT_FIELDS, Config, ModelConfig
from jaxlm.data import loader
from jaxlm.instruct import chat_template
from jaxlm.io import TrainCheckpoints
from jaxlm.io.checksums import DamagedError
from jaxlm.io.lock import WorkdirBusy, WorkdirLock
from jaxlm.io.read import read_base
from jaxlm.objectives import Objective, check_seq_len
from jaxlm.optim import make_optimizer, schedule
from jaxlm.sharding import batch_sharding, check_batch_fits, check_model_fits, like_params, make_mesh, param_shardings
from jaxlm.tokenizer import ByteTokenizer, Tokenizer, load_tokenizer, with_chat_template
from jaxlm.train.steps import StepSpec, make_eval_step, make_train_step
from jaxlm.transformer import abstract_model, build_model, model_graphdef, params_for


@dataclasses.dataclass
class Run:
    """A training run, set up: the loop and its hooks read it and update ``state`` / ``masks``."""

    cfg: Config  # resolved: absolute paths, the model as trained (base shape, special ids, labels)
    workdir: Path
    log: Callable[[str], None]
    tokenizer: Tokenizer
    mesh: Any
    objective: Objective  # the objective's static step settings (it is asked what the run's objective does)
    train_step: Callable  # (state, batch, frozen, masks, second_params) -> (state, metrics)
    eval_step: Callable  # (params, batch, index) -> the objective's eval sums
    state: dict  # {"params": trainable params, "opt_state", "step"}, on the mesh
    frozen: dict | None  # parameters that take part but do not train (a LoRA / prompt-tuning base)
    second_params: dict | None  # a second, untrained model: distill's teacher, dpo's reference
    train_iter: Any  # checkpointable grain iterator of this host's rows
    val_rows: Any
    to_device: Callable  # this host's rows -> global arrays split over data x fsdp
    checkpoints: TrainCheckpoints
    start: int  # the step the run resumes after (0: a fresh run)
    masks: dict | None = None  # pruning masks, re-applied after every update
    lock: Any = None  # the WorkdirLock held for this run (setup(lock_workdir=True), process 0)

    @property
    def total(self) -> int:
        return self.cfg.train.steps

    def full_params(self, params) -> dict:
        return params if self.frozen is None else tree.merge(params, self.frozen)

    def eval_batches(self) -> int:
        return self.objective.eval_batches(len(self.val_rows), self.cfg.data.batch_size, self.cfg.train.eval_batches)


def data_tokenizer(data_cfg) -> Tokenizer:
    """data.tokenizer: "byte", or a directory holding tokenizer files."""
    if data_cfg.tokenizer == "byte":
        return ByteTokenizer()
    tok = load_tokenizer(data_cfg.tokenizer)
    if tok is None:
        raise ValueError(f"data.tokenizer={data_cfg.tokenizer}: no tokenizer files found there")
    return tok


def setup(cfg: Config, log, *, lock_workdir: bool = False) -> Run:
    """Build (or restore) everything a run of ``cfg`` needs; see the module docstring.
    ``lock_workdir``: hold the workdir (``WorkdirLock``, process 0) once the checks pass, before
    anything is written; ``Run.lock`` is released by the caller."""
    cfg = cfg.with_absolute_paths()  # a run's config.json refers to other models from any directory
    objective = objectives.get(cfg.train.objective)
    cfg, base_params, tokenizer = _model_and_tokenizer(cfg, log)
    cfg, prepared = objective.model_config(cfg, tokenizer, log)
    _check(cfg, tokenizer)
    objective.check(cfg, tokenizer)
    template = chat_template(cfg.data, tokenizer) if objective.chat or cfg.data.chat_template else None
    if cfg.data.chat_template:  # saved with the run: jaxlm serve renders chats as they were trained
        tokenizer = with_chat_template(tokenizer, template)
    # Mesh and shape checks come first: a bad mesh fails in one line, before anything compiles.
    mesh = make_mesh(cfg.mesh)
    check_model_fits(cfg.model, mesh)
    check_batch_fits(cfg.data.batch_size, mesh, cfg.optim.grad_accum)
    lock = _lock(cfg.train.workdir, log) if lock_workdir else None
    try:
        run = _build(cfg, log, objective, base_params, tokenizer, prepared, template, mesh)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    run.lock = lock
    return run


def _lock(workdir, log) -> WorkdirLock | None:
    """Process 0 takes the workdir (the other processes of this run write nothing it guards);
    in a multi-host run every process learns the outcome, so all refuse together, none waits."""
    lock, busy = None, None
    if jax.process_index() == 0:
        try:
            lock = WorkdirLock(workdir)
        except WorkdirBusy as e:
            busy = e
        if lock is not None and lock.taken_over:
            log(f"took over the workdir lock left by {lock.taken_over} (no longer running)")
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        if int(multihost_utils.broadcast_one_to_all(np.int32(busy is not None))) and busy is None:
            busy = WorkdirBusy(f"{workdir} is in use by another jaxlm train (process 0 found it locked)")
    if busy is not None:
        raise busy
    return lock


def _build(cfg: Config, log, objective: type[Objective], base_params, tokenizer, prepared, template, mesh) -> Run:
    """setup() past the checks: data, state, steps, and the checkpoint to resume from."""
    pi, pc = jax.process_index(), jax.process_count()
    if pc > 1:
        log(f"process {pi} of {pc}: {jax.local_device_count()} local devices, {jax.device_count()} in all; "
            f"mesh data={mesh.shape['data']} fsdp={mesh.shape['fsdp']} tensor={mesh.shape['tensor']}")
    rows_of = objective.from_run(cfg, tokenizer, None)  # the rows do not depend on the second model
    train_rows, val_rows = (rows_of.rows(cfg, split, tokenizer, evaluation=split != "train", template=template,
                                         prepared=prepared, log=log) for split in ("train", "validation"))
    it = loader(train_rows, batch_size=cfg.data.batch_size, seed=cfg.train.seed, process_index=pi,
                process_count=pc)

    # model.scan_layers picks the layout of params and optimizer state in this run's checkpoints.
    model_cfg = cfg.model.replace(dtype=cfg.train.dtype)
    graphdef = model_graphdef(model_cfg)
    state_programs = _state_programs(model_cfg, mesh, cfg.adapt.method, cfg.optim, cfg.train.steps, cfg.train.seed)
    params, frozen = _init_params(cfg, model_cfg, state_programs, base_params)
    second = objective.second_model(cfg, model_cfg, mesh, log, graphdef=graphdef, params=params, frozen=frozen,
                                  base_params=base_params)
    opt_state = state_programs.opt_init(params)
    rows_sharding = batch_sharding(mesh)

    def to_device(local):  # this host's rows -> one global array (or a dict of them), split over data x fsdp
        return jax.tree.map(lambda x: jax.make_array_from_process_local_data(rows_sharding, np.asarray(x)), local)

    workdir = Path(cfg.train.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    ckpts = TrainCheckpoints(workdir, keep=cfg.train.keep)
    try:
        start = _intact_step(ckpts, log)
        if start:
            params, opt_state = _restore(ckpts, start, workdir, cfg, params, opt_state, it)
    except BaseException:
        ckpts.close()
        raise
    if start:
        log(f"resumed from {workdir}/checkpoints/{start}")
    if pi == 0:
        (workdir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        tokenizer.save(workdir)
        _truncate_metrics(workdir / "metrics.jsonl", start)

    spec = StepSpec(objective.from_run(cfg, tokenizer, second), cfg.optim.grad_accum, cfg.train.seed)
    train_step, eval_step = _step_programs(model_cfg, mesh, cfg.adapt.method, cfg.optim, cfg.train.steps,
                                           cfg.train.seed, spec, second and second[0])
    step = jax.device_put(jnp.int32(start), state_programs.state_sharding["step"])
    state = {"params": params, "opt_state": opt_state, "step": step}
    second_params = second and second[1]
    return Run(cfg=cfg, workdir=workdir, log=log, tokenizer=tokenizer, mesh=mesh, objective=spec.objective,
               train_step=train_step, eval_step=functools.partial(eval_step, second_params=second_params), state=state,
               frozen=frozen, second_params=second_params, train_iter=it, val_rows=val_rows, to_device=to_device,
               checkpoints=ckpts, start=start)


def _model_and_tokenizer(cfg: Config, log):
    """(cfg with the model as trained, the base model's params or None, the tokenizer).

    adapt.init names the pretrained model to start from: its shape wins over model.*, the run
    keeps its own training and runtime fields. The tokenizer the model is trained with decides its
    special ids (generation stops at its EOS).
    """
    base_params, tokenizer = None, None
    if not cfg.adapt.init:
        if cfg.adapt.method != "full":
            raise ValueError(f"adapt.method={cfg.adapt.method} needs a pretrained model: set adapt.init=PATH")
    else:
        base_cfg, base_params, tokenizer = read_base(cfg.adapt.init, "adapt.init")
        model = adapted_config(base_cfg, cfg.adapt, cfg.model, cfg.adapt.init)
        if cfg.prune.sparsity and cfg.adapt.method != "full":
            raise ValueError("prune.sparsity needs adapt.method=full (the pruned weights must be trainable)")
        base_params = params_for(model, base_params)
        cfg = dataclasses.replace(cfg, model=model)
        log(f"starting from {cfg.adapt.init} ({model.name}, {cfg.adapt.method} fine-tuning)")
    tokenizer = tokenizer or data_tokenizer(cfg.data)
    model = cfg.model.replace(eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id,
                              bos_token_id=cfg.model.bos_token_id if tokenizer.eos_id is None else tokenizer.eos_id)
    return dataclasses.replace(cfg, model=model), base_params, tokenizer


def _check(cfg: Config, tokenizer) -> None:
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size="
                         f"{cfg.model.vocab_size}; set model.vocab_size={tokenizer.vocab_size}")
    check_seq_len(cfg.data.seq_len, cfg.model.context)
    if cfg.data.batch_size % cfg.optim.grad_accum:
        raise ValueError(f"data.batch_size={cfg.data.batch_size} is not divisible by optim.grad_accum="
                         f"{cfg.optim.grad_accum}")


# The jitted programs of a run, built once per setup in a process: another run of the same setup
# (a resumed run, a sweep in a notebook, a test) traces, lowers and compiles none of them again,
# since jax keeps compiled programs per function object. Every argument is a hashable config.
@dataclasses.dataclass(frozen=True)
class StatePrograms:
    init: Callable  # () -> every param of the model, fresh, laid out on the mesh
    full_sharding: dict  # every param's sharding
    opt_init: Callable  # trainable params -> optimizer state, laid out like them
    state_sharding: dict  # the train state's: {"params": trainable params', "opt_state": ..., "step": replicated}
    tx: Any  # the optax transformation


@functools.lru_cache(maxsize=4)
def _state_programs(model_cfg: ModelConfig, mesh, method: str, optim, steps: int, seed: int) -> StatePrograms:
    full = param_shardings(model_cfg, mesh)
    init = jax.jit(lambda: nnx.to_pure_dict(nnx.state(build_model(model_cfg, seed), nnx.Param)), out_shardings=full)
    keep = trainable(method)  # the optimizer and the checkpoints hold the trainable params only
    p_sharding, _ = tree.split(full, keep)
    shapes, _ = tree.split(nnx.to_pure_dict(nnx.state(abstract_model(model_cfg), nnx.Param)), keep)
    tx = make_optimizer(optim, steps)
    o_sharding = like_params(jax.eval_shape(tx.init, shapes), p_sharding, mesh)
    state_sharding = {"params": p_sharding, "opt_state": o_sharding,
                      "step": jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())}
    return StatePrograms(init, full, jax.jit(tx.init, out_shardings=o_sharding), state_sharding, tx)


@functools.lru_cache(maxsize=4)
def _step_programs(model_cfg: ModelConfig, mesh, method: str, optim, steps: int, seed: int, spec: StepSpec,
                   second_graphdef):
    """(train_step, eval_step); ``second_graphdef``: the teacher's or the DPO reference's, or None."""
    s = _state_programs(model_cfg, mesh, method, optim, steps, seed)
    graphdef = model_graphdef(model_cfg)
    train_step = make_train_step(graphdef, s.tx, spec, schedule(optim, steps),
                                 dropout=model_cfg.dropout > 0 or model_cfg.attention_dropout > 0,
                                 state_sharding=s.state_sharding, second_graphdef=second_graphdef)
    return train_step, make_eval_step(graphdef, spec, second_graphdef)


def _init_params(cfg: Config, model_cfg: ModelConfig, programs: StatePrograms, base_params):
    """(trainable params, frozen params or None), created straight into the mesh layout (the full
    model never sits on one device), the base model's weights replacing the fresh ones where it has
    them (new adapters stay as initialised)."""
    params = programs.init()
    if base_params is not None:
        params = tree.overlay(params, base_params)
        if cfg.adapt.method == "prompt":  # a soft prompt starts as the embeddings of random tokens
            ids = np.random.default_rng(cfg.train.seed).integers(0, model_cfg.vocab_size, model_cfg.prompt_length)
            params["prompt"] = jnp.take(params["embed"]["tokens"]["embedding"], jnp.asarray(ids), axis=0)
        params = jax.device_put(params, programs.full_sharding)
    params, frozen = tree.split(params, trainable(cfg.adapt.method))
    return params, frozen or None


def _intact_step(ckpts: TrainCheckpoints, log) -> int:
    """The latest checkpoint whose files match their checksums (0: none). A damaged one is moved
    to WORKDIR/damaged/ with a warning and the one before it is used; with none before it, stop."""
    while (step := ckpts.latest_step()):
        try:
            ckpts.verify(step)
            return step
        except DamagedError as e:
            if len(ckpts.all_steps()) < 2:
                raise ValueError(f"{e}; it is the only checkpoint in {ckpts.directory}: restore the file "
                                 "from a copy, or use another train.workdir") from None
            moved = ckpts.set_aside(step)
            log(f"warning: checkpoint of step {step} is damaged ({e.file}: {e.reason}); moved it to "
                f"{moved} and resuming from the checkpoint of step {ckpts.latest_step()}")
    return 0


def _restore(ckpts: TrainCheckpoints, step: int, workdir: Path, cfg: Config, params, opt_state, it):
    saved = ModelConfig.from_dict(ckpts.meta(step)["config"]["model"])
    field = saved.first_difference(cfg.model, CHECKPOINT_FIELDS)
    if field is not None:
        raise ValueError(f"{workdir} holds a checkpoint of a different model (model.{field}: "
                         f"{getattr(saved, field)!r} there, {getattr(cfg.model, field)!r} now); "
                         "use another train.workdir")
    try:
        return ckpts.restore(step, params, opt_state, it)
    except ValueError as e:  # e.g. optim.name or optim.clip_norm changed the optimizer state
        raise ValueError(f"{workdir}/checkpoints/{step} does not match this run's optimizer state "
                         f"({str(e).splitlines()[0]}); keep the optim settings or use another "
                         "train.workdir") from None


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop lines past the restored step (they will be logged again, identically)."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)
