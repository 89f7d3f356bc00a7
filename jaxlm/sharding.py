"""Device meshes and the one table that maps the model's logical axes onto them.

Model code names logical axes only (batch, length, embed, heads, kv_heads, kv, mlp, vocab, layers);
``RULES`` maps each to mesh axes (data, fsdp, tensor). A dimension that a mesh axis does not divide
evenly stays replicated along it (e.g. GPT-2's 50257-token vocabulary under tensor=2).
"""

from __future__ import annotations

import math

import jax
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from jaxlm.config import MeshConfig, ModelConfig
from jaxlm.transformer import abstract_model

AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axes (a tuple shards over several), None = replicated.
RULES: dict[str, tuple[str, ...] | str | None] = {
    "batch": ("data", "fsdp"),
    "length": None,
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "vocab": "tensor",
    "layers": None,
}


def mesh_shape(cfg: MeshConfig, n_devices: int) -> tuple[int, int, int]:
    """(data, fsdp, tensor) with -1 resolved; sizes that do not divide n_devices are refused."""
    sizes = [cfg.data, cfg.fsdp, cfg.tensor]
    if sizes.count(-1) > 1:
        raise ValueError("at most one of mesh.data, mesh.fsdp, mesh.tensor may be -1")
    fixed = math.prod(s for s in sizes if s != -1)
    divisors = [d for d in range(1, n_devices + 1) if n_devices % d == 0]
    if any(s == 0 or s < -1 for s in sizes) or n_devices % fixed:
        raise ValueError(f"mesh (data={cfg.data}, fsdp={cfg.fsdp}, tensor={cfg.tensor}) does not fit "
                         f"{n_devices} devices; each size must be >= 1 (or -1: the rest) and their product must "
                         f"divide {n_devices}: {', '.join(map(str, divisors))}")
    # Explicit sizes may use a subset of the devices (the first ones), e.g. (1, 1, 1) for one device.
    return tuple(n_devices // fixed if s == -1 else s for s in sizes)


def make_mesh(cfg: MeshConfig, devices=None) -> jax.sharding.Mesh:
    """A (data, fsdp, tensor) mesh with Auto axes (GSPMD propagates shardings from the rules)."""
    devices = devices if devices is not None else jax.devices()
    shape = mesh_shape(cfg, len(devices))
    return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * 3, devices=devices[:math.prod(shape)])


def check_model_fits(cfg: ModelConfig, mesh) -> None:
    """Refuse (one line, before anything compiles) a model whose heads the tensor axis cannot split."""
    t = mesh.shape["tensor"]
    for field, n in (("n_heads", cfg.n_heads), ("n_kv_heads", cfg.kv_heads)):
        if n % t:
            raise ValueError(f"model.{field}={n} is not divisible by mesh.tensor={t}; use a tensor size "
                             f"that divides it: {', '.join(str(d) for d in range(1, n + 1) if n % d == 0)}")


def check_batch_fits(batch_size: int, mesh, grad_accum: int = 1) -> None:
    """The global batch splits over data x fsdp (and each micro-batch too)."""
    split = mesh.shape["data"] * mesh.shape["fsdp"]
    if batch_size % (split * grad_accum):
        extra = f" x optim.grad_accum={grad_accum} micro-batches" if grad_accum > 1 else ""
        raise ValueError(f"data.batch_size={batch_size} does not split over mesh.data x mesh.fsdp = {split} "
                         f"devices{extra}; use a multiple of {split * grad_accum}")


def spec_for(shape, logical_axes, mesh) -> PartitionSpec:
    """The PartitionSpec of an array with these logical axes; indivisible dims stay replicated."""
    out, used = [], set()
    for dim, name in zip(shape, logical_axes):
        rule = RULES.get(name) if name is not None else None
        axes = tuple(a for a in ((rule,) if isinstance(rule, str) else (rule or ()))
                     if a not in used and mesh.shape[a] > 1)
        if axes and dim % math.prod(mesh.shape[a] for a in axes) == 0:
            used.update(axes)
            out.append(axes[0] if len(axes) == 1 else axes)
        else:
            out.append(None)
    return PartitionSpec(*out)


def param_shardings(cfg: ModelConfig, mesh) -> dict:
    """NamedShardings for the params of ``cfg`` (in its layout), as a pure dict like the params."""
    state = nnx.state(abstract_model(cfg), nnx.Param)
    specs = jax.tree.map(lambda v: NamedSharding(mesh, spec_for(v.shape, v.get_metadata()["out_sharding"], mesh)),
                         state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.to_pure_dict(specs)


def constrain(x, logical_axes):
    """Pin ``x``'s layout inside jit to the rules, when a mesh is set (``jax.set_mesh``); else a no-op."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not set(AXES) <= set(mesh.axis_names):
        return x
    return jax.lax.with_sharding_constraint(x, spec_for(x.shape, logical_axes, mesh))


def batch_sharding(mesh) -> NamedSharding:
    """Rows split across the data and fsdp axes."""
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp")))


def like_params(tree, params_sharding, mesh):
    """Shardings for a tree whose leaves mirror parameters (e.g. optimizer moments): a leaf whose
    path ends with a parameter's path and has its shape takes that parameter's sharding; anything
    else (step counts, scalars) is replicated."""
    flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(params_sharding)}
    replicated = NamedSharding(mesh, PartitionSpec())

    def pick(path, leaf):
        key = jax.tree_util.keystr(path)
        for name, sharding in flat.items():
            if key.endswith(name) and len(sharding.spec) <= len(getattr(leaf, "shape", ())):
                return sharding
        return replicated

    return jax.tree_util.tree_map_with_path(pick, tree)
