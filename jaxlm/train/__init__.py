"""Training: ``train(cfg)`` = ``setup`` (setup.py) + a loop of hooks (loop.py, hooks.py) over the
pure jitted steps (steps.py) of an objective (``jaxlm.objectives``); ``evaluate`` is shared with ``jaxlm eval``."""

from jaxlm.train.evaluate import EvalTotals, evaluate  # noqa: F401
from jaxlm.train.hooks import Hook, StepInfo, TrainingError  # noqa: F401
from jaxlm.train.loop import Trainer, train  # noqa: F401
from jaxlm.objectives.mlm import mlm_inputs  # noqa: F401
from jaxlm.train.setup import Run, check_seq_len, data_tokenizer, setup  # noqa: F401
from jaxlm.train.steps import StepSpec, make_eval_step, make_train_step  # noqa: F401
