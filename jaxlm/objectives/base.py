"""What an objective is: the static settings of the jitted steps (a frozen dataclass) and the
functions the trainer, the steps and ``jaxlm eval`` ask it for. See ``jaxlm.objectives``.

Dimension legend: B batch rows, T length, V vocab.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Objective:
    """A training objective. Subclasses are frozen dataclasses whose fields are everything the
    jitted steps need to know statically (they are hashed into the compiled programs), built by
    ``from_run``; the class methods set a run up, the instance methods run inside the steps.

    Room for objectives that make their own batches (a rollout phase, as GRPO will): ``batches``
    turns the loader's batch into the batches the optimizer steps on, ``updates_per_batch`` of
    them, before the next one is read; the defaults are one update on the batch as read.
    """

    name: ClassVar[str]
    packings: ClassVar[tuple[str, ...]] = ("eos", "segments")  # data.packing it takes; the first is the default
    chat: ClassVar[bool] = False  # its examples may be chats: it needs a chat template
    updates_per_batch: ClassVar[int] = 1

    # -- setting a run up (on the host) --------------------------------------------------------

    @classmethod
    def check(cls, cfg, tokenizer) -> None:
        """Refuse settings this objective cannot train with (one clear ValueError)."""
        packing = cfg.data.packing
        if packing and packing not in cls.packings:
            raise ValueError(f"data.packing={packing} does not apply to train.objective={cls.name}; use "
                             + " or ".join(cls.packings))
        if cfg.model.prompt_length and cls.packing(cfg) == "segments":
            raise ValueError("packed examples (data.packing=segments) cannot share a soft prompt; use data.packing=pad")

    @classmethod
    def packing(cls, cfg) -> str:
        """The run's data.packing, or this objective's default ("" when it packs nothing)."""
        return cfg.data.packing or (cls.packings[0] if cls.packings else "")

    @classmethod
    def model_config(cls, cfg, tokenizer, log):
        """(cfg with the model as this objective trains it, data it read on the way or None)."""
        return cfg, None

    @classmethod
    def second_model(cls, cfg, model_cfg, mesh, log, *, graphdef, params, frozen, base_params):
        """A second, untrained model the loss needs, as (graphdef, params on the mesh, extra), or
        None (see distill's teacher, dpo's reference)."""
        return None

    @classmethod
    def from_run(cls, cfg, tokenizer, second) -> "Objective":
        """The static step settings of a run (``second``: ``second_model``'s result)."""
        return cls()

    @classmethod
    def scored_by(cls, model_config) -> str:
        """The objective ``jaxlm eval`` scores a model trained with this one by."""
        return cls.name

    @classmethod
    def claims(cls, model_config) -> bool:
        """Whether a model can only be scored by this objective (a classifier's head)."""
        return False

    def rows(self, cfg, split: str, tokenizer, *, template=None, prepared=None, log=None):
        """The split's rows, indexable (what the loader batches); ``evaluation``: to be evaluated
        (small splits are padded to whole batches where the objective scores examples)."""
        raise NotImplementedError

    def eval_batches(self, n_rows: int, batch_size: int, requested: int, *, report: bool = False) -> int:
        """How many validation batches an evaluation reads: ``requested`` (train.eval_batches, or
        jaxlm eval's --batches), which ``report`` (jaxlm eval) caps at the split's size."""
        return min(requested, max(1, n_rows // batch_size)) if report else requested

    def batches(self, run, batch):
        """The batches the optimizer steps on for one batch of the loader (see the class docstring)."""
        yield batch

    # -- inside the jitted steps -----------------------------------------------------------------

    def second(self, graphdef, full_params, second_graphdef, second_params):
        """The second model as the loss takes it (None: none)."""
        return None

    def loss_sums(self, model, rows, *, key=None, mask_key=None, second=None):
        """(sum of losses, number of scored tokens or examples, stats) of one batch; ``stats`` maps
        a metric name to (numerator sum, denominator sum), so micro-batches and hosts add up
        exactly. ``key`` turns dropout on; ``mask_key`` draws MLM masks; ``second``: ``second``'s model."""
        raise NotImplementedError

    def eval_sums(self, model, rows, *, mask_key, second=None) -> tuple:
        """``loss_sums`` without dropout, and whatever else an evaluation adds up (a tuple)."""
        return self.loss_sums(model, rows, mask_key=mask_key, second=second)

    # -- after an evaluation ----------------------------------------------------------------------

    def eval_metrics(self, totals) -> dict:
        """Metrics beyond the loss and the stats' ratios (``train.EvalTotals``)."""
        return {}

    def report(self, totals) -> dict:
        """What ``jaxlm eval`` prints besides the loss: perplexity and the tokens scored."""
        return {"perplexity": math.exp(totals.loss), "tokens": int(totals.count)}


def check_seq_len(seq_len: int, context: int) -> None:
    if seq_len > context:
        raise ValueError(f"data.seq_len={seq_len} exceeds the model's context of {context} tokens "
                         "(model.max_len, less model.prompt_length with a soft prompt)")


def token_nll(logits, targets):
    """-log p(target) per token [B, T] (logsumexp - target logit), and the target logits."""
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return jax.nn.logsumexp(logits, axis=-1) - target_logit, target_logit


def forward(model, inputs, segments=None, key=None):
    """Logits of rows, with segment ids when examples are packed. A soft-prompted model cannot
    isolate packed examples (they would share the prompt), so its rows hold one example each
    (data.packing=pad) and the segment ids serve as the padding mask."""
    if segments is None:
        return model(inputs, key=key)
    if model.config.prompt_length:
        return model(inputs, segments > 0, key=key)
    return model(inputs, key=key, segment_ids=segments)


def token_sums(logits, per_token, targets, weights, extra=0.0):
    """(weighted loss sum + extra, weight sum, {"accuracy"}) of per-token losses [B, T]; a token
    is "correct" when its target's logit is the largest (no argmax: it is slow on CPU)."""
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    correct = (target_logit >= jax.lax.stop_gradient(logits.max(-1))).astype(jnp.float32)
    n = weights.sum()
    return (per_token * weights).sum() + extra, n, {"accuracy": ((correct * weights).sum(), n)}


def segments_from_eos(inputs, eos: int):
    """Segment ids [B, T] of an EOS-separated row: each EOS opens a segment (it stands in for the
    next document's BOS), so no document attends to another and positions restart at each."""
    return jnp.cumsum(inputs == eos, axis=1, dtype=jnp.int32) + 1
