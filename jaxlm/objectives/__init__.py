"""Training objectives, one module each, looked up by name: ``objectives.get("dpo")``.

An objective (``base.Objective``) owns its rows, its default packing, its static step settings,
its loss sums and eval metrics, its second model (a teacher, a reference) and how many batches an
evaluation reads; ``train`` and ``jaxlm eval`` ask it and never compare names. Adding an objective
is one module with a ``@register``-ed class, imported below.
"""

from __future__ import annotations

from jaxlm.config import closest
from jaxlm.objectives.base import Objective, check_seq_len, forward, token_nll  # noqa: F401

REGISTRY: dict[str, type[Objective]] = {}


def register(cls: type[Objective]) -> type[Objective]:
    """Class decorator: make an objective available as ``train.objective=<cls.name>``."""
    REGISTRY[cls.name] = cls
    return cls


def get(name: str) -> type[Objective]:
    """The objective called ``name`` (train.objective), or a ValueError naming the ones there are."""
    if name not in REGISTRY:
        raise ValueError(f"train.objective={name!r} is not one of {', '.join(REGISTRY)}" + closest(str(name), REGISTRY))
    return REGISTRY[name]


def scoring(name: str | None, model_config) -> type[Objective]:
    """The objective ``jaxlm eval`` scores a model by: one that claims the model (a classifier),
    else what ``name``'s objective (the run's, or train.objective=) says, else the model's own LM loss."""
    for cls in REGISTRY.values():
        if cls.claims(model_config):
            return cls
    if name is None:
        return get("clm" if model_config.causal else "mlm")
    return get(get(name).scored_by(model_config))


# Each module registers its objective; this order is the order `train.objective` lists them in.
from jaxlm.objectives import clm, mlm, distill, classify, sft, dpo  # noqa: E402, F401, I001
