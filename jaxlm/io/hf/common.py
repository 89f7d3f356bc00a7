"""What the family modules share: the weight rule, its common forms, activation names.

A ``Rule`` maps one Hugging Face tensor (per layer, where its name has ``{}``) to one or more
jaxlm parameters and back: ``targets`` give each parameter from the HF tensor, ``to_hf`` the HF
tensor from those parameters (in the same order). Both directions only move numbers (transpose,
reshape, split, join), so a round trip gives the same bytes in the same dtype.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable

import numpy as np

# Buffers any family may carry in its files; they are not weights.
BUFFERS = re.compile(r"(^|\.)position_ids$")

ACT_FROM_HF = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu",
               "relu": "relu", "silu": "silu", "swish": "silu"}
ACT_TO_HF = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu", "silu": "silu"}


@dataclasses.dataclass(frozen=True)
class Rule:
    name: str  # the HF name without the family's body prefix; "{}" stands for the layer index
    shape: tuple  # the shape the config implies for it (one layer's)
    targets: tuple[tuple[str, Callable], ...]  # (jaxlm param path, HF tensor -> that param's value)
    to_hf: Callable | None  # (values of the targets, in order) -> HF tensor; None: not written (tied)
    aliases: tuple[str, ...] = ()  # other names it is read from (older checkpoints)
    head: bool = False  # outside the body: never carries the family's prefix
    torch_linear: bool = False  # the weight of a torch Linear module (LoRA adapters in PEFT form fit it)

    @property
    def layered(self) -> bool:
        return "{}" in self.name

    def pattern(self) -> re.Pattern:
        alts = [re.escape(n).replace(r"\{\}", r"(\d+)") for n in (self.name, *self.aliases)]
        return re.compile("|".join(f"(?:{a})" for a in alts))


def same(name: str, shape: tuple, path: str, **kw) -> Rule:
    """A tensor stored as jaxlm stores it (embeddings, norms, [in, out] kernels, biases)."""
    return Rule(name, shape, ((path, ident),), ident, **kw)


def reshaped(name: str, shape: tuple, path: str, param_shape: tuple, **kw) -> Rule:
    """The same numbers in another shape (e.g. a bias [H * Dh] as [H, Dh])."""
    return Rule(name, shape, ((path, lambda w: w.reshape(param_shape)),), lambda p: p.reshape(shape), **kw)


def linear(name: str, shape: tuple, path: str, param_shape: tuple | None = None, **kw) -> Rule:
    """A torch Linear weight [out, in] as a jaxlm kernel [in..., out...]."""
    out_dim, in_dim = shape
    param_shape = param_shape or (in_dim, out_dim)
    return Rule(name, shape, ((path, lambda w: transpose(w).reshape(param_shape)),),
                lambda k: transpose(k.reshape(in_dim, out_dim)), torch_linear=True, **kw)


def tied(name: str, shape: tuple, **kw) -> Rule:
    """An output matrix tied to the token embeddings: read and dropped, never written."""
    return Rule(name, shape, (), None, head=True, **kw)


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
