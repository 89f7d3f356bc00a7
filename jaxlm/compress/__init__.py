"""Adapt and compress models, one module per technique. Each works on a (config, params) pair
and returns a new pair that ``jaxlm.load`` / ``LM`` run as they are:

- ``lora``: low-rank adapters beside chosen kernels (trained by ``jaxlm train adapt.method=lora``),
  merged into the kernels for export.
- ``quantize``: int8 weight-only kernels and embeddings with per-channel scales.
- ``lowrank``: kernels replaced by rank-r SVD factors.
- ``prune``: magnitude masks (global or per layer, gradual schedule) and attention-head pruning.
"""

from jaxlm.compress.tree import count_params, nbytes  # noqa: F401
