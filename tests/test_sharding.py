"""Meshes and logical-axis rules on 8 simulated CPU devices (conftest sets XLA_FLAGS)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxlm import ModelConfig, build_model
from jaxlm.config import MeshConfig
from jaxlm.sharding import batch_sharding, make_mesh, mesh_shape, param_shardings

from conftest import ragged_batch

SMALL = dict(vocab_size=96, max_len=32, d_model=32, n_layers=2, n_heads=4, init_std=0.2)


def test_eight_simulated_devices():
    assert jax.device_count() == 8


def test_mesh_sizes_resolved_and_refused():
    assert mesh_shape(MeshConfig(), 8) == (8, 1, 1)
    assert mesh_shape(MeshConfig(data=2, fsdp=-1, tensor=2), 8) == (2, 2, 2)
    with pytest.raises(ValueError, match="does not fit 8 devices; each size must divide it: 1, 2, 4, 8"):
        mesh_shape(MeshConfig(data=3), 8)
    assert make_mesh(MeshConfig(data=2, fsdp=2, tensor=1)).devices.size == 4  # a subset is allowed


def test_parameter_specs_follow_the_rules():
    cfg = ModelConfig.preset("gpt2-tiny", **SMALL)  # stacked layout
    specs = jax.tree.map(lambda s: s.spec, param_shardings(cfg, make_mesh(MeshConfig(2, 2, 2))))
    blocks = specs["layers"]["blocks"]
    assert blocks["attn"]["q"]["kernel"] == P(None, "fsdp", "tensor", None)
    assert blocks["attn"]["o"]["kernel"] == P(None, "tensor", None, "fsdp")
    assert blocks["mlp"]["up"]["kernel"] == P(None, "fsdp", "tensor")
    assert specs["embed"]["tokens"]["embedding"] == P("tensor", "fsdp")
    odd = ModelConfig.preset("gpt2-tiny", **{**SMALL, "vocab_size": 97})  # 97 is not divisible by 2
    odd_specs = param_shardings(odd, make_mesh(MeshConfig(2, 2, 2)))
    assert odd_specs["embed"]["tokens"]["embedding"].spec == P(None, "fsdp")


@pytest.mark.parametrize("preset", ["gpt2-tiny", "bert-tiny"])
@pytest.mark.parametrize("shape", [(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 2, 4)])
def test_sharded_forward_equals_one_device(preset, shape):
    cfg = ModelConfig.preset(preset, **SMALL)
    params = nnx.to_pure_dict(nnx.state(build_model(cfg), nnx.Param))
    graphdef = nnx.graphdef(build_model(cfg))
    ids, mask = ragged_batch(96, [16, 9, 12, 5, 16, 3, 7, 11], seed=0)
    forward = jax.jit(lambda p, i, m: nnx.merge(graphdef, p)(i, m))
    want = np.asarray(forward(params, jnp.asarray(ids), jnp.asarray(mask)))
    mesh = make_mesh(MeshConfig(*shape))
    sharded = jax.device_put(params, param_shardings(cfg, mesh))
    rows = batch_sharding(mesh)
    got = forward(sharded, jax.device_put(jnp.asarray(ids), rows), jax.device_put(jnp.asarray(mask), rows))
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=1e-5)


def test_fsdp8_largest_shard_is_an_eighth():
    cfg = ModelConfig.preset("gpt2-tiny", **{**SMALL, "d_model": 64})
    mesh = make_mesh(MeshConfig(1, 8, 1))
    params = jax.device_put(nnx.to_pure_dict(nnx.state(build_model(cfg), nnx.Param)), param_shardings(cfg, mesh))
    total = sum(x.size for x in jax.tree.leaves(params))
    per_device = [0] * 8
    for x in jax.tree.leaves(params):
        for s in x.addressable_shards:
            per_device[s.device.id] += s.data.size
    replicated = sum(x.size for x in jax.tree.leaves(params) if x.sharding.is_fully_replicated)
    assert max(per_device) <= total / 8 + replicated  # only small vectors (biases, norms) replicate
    assert replicated < 0.05 * total


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    import shutil

    from jaxlm.data import stdlib_dir

    root = tmp_path_factory.mktemp("corpus")
    (root / "text").mkdir()
    for f in sorted(stdlib_dir().glob("*.py"))[:30]:
        shutil.copy(f, root / "text" / f.name)
    return root


@pytest.mark.parametrize("preset, objective", [("gpt2-tiny", "clm"), ("bert-tiny", "mlm")])
def test_training_on_meshes_matches_one_device(small_corpus, tmp_path, preset, objective):
    import json

    from jaxlm.config import load_config
    from jaxlm.train import train

    def run(shape):
        w = tmp_path / f"{preset}-{'x'.join(map(str, shape))}"
        argv = [f"model={preset}", "model.vocab_size=259", "model.d_model=32", "model.n_layers=2",
                "model.n_heads=4", "model.max_len=32", "model.dropout=0", "model.attention_dropout=0",
                "data.seq_len=32", "data.batch_size=8", f"data.path={small_corpus / 'text'}",
                f"data.data_dir={small_corpus / 'cache'}", f"train.objective={objective}", "train.steps=5",
                "train.eval_every=0", "train.save_every=5", f"train.workdir={w}",
                f"mesh.data={shape[0]}", f"mesh.fsdp={shape[1]}", f"mesh.tensor={shape[2]}"]
        train(load_config(None, argv), log=lambda m: None)
        return [json.loads(x)["loss"] for x in open(w / "metrics.jsonl")]

    base = run((1, 1, 1))  # one device
    for shape in [(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 2, 4)]:
        np.testing.assert_allclose(run(shape), base, rtol=1e-5)
