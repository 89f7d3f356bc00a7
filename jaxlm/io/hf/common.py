"""What the family modules share: the rule type, tensor transforms, activation names."""

from __future__ import annotations

import re
from typing import Callable

import numpy as np

# (HF tensor name pattern, the shape the config implies for it, [(jaxlm param path, transform)]).
# The pattern's one group, if any, is the layer index; its targets are filled layer by layer.
Rule = tuple[str, tuple, list[tuple[str, Callable]]]

# Buffers any family may carry in its files; they are not weights.
BUFFERS = re.compile(r"(^|\.)position_ids$")

ACT_FROM_HF = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu",
               "relu": "relu", "silu": "silu", "swish": "silu"}
ACT_TO_HF = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu", "silu": "silu"}


def ident(x):
    return x


def transpose(w):
    """[out, in] (torch Linear) <-> [in, out] (jaxlm kernels)."""
    return np.ascontiguousarray(w.T)


def activation_from_hf(name: str) -> str:
    if name not in ACT_FROM_HF:
        raise ValueError(f"unsupported activation {name!r}; supported: {', '.join(ACT_FROM_HF)}")
    return ACT_FROM_HF[name]


def d_ff_from_hf(d_ff, d_model):
    """None (the 4 * d_model default) when HF's MLP width says the default."""
    return None if d_ff in (None, 4 * d_model) else d_ff
