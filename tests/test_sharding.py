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

from conftest import TEST_XLA_FLAGS, ragged_batch, stdlib_slice

SMALL = dict(vocab_size=96, max_len=32, d_model=32, n_layers=2, n_heads=4, init_std=0.2)


def test_eight_simulated_devices():
    assert jax.device_count() == 8


def test_mesh_sizes_resolved_and_refused():
    assert mesh_shape(MeshConfig(), 8) == (8, 1, 1)
    assert mesh_shape(MeshConfig(data=2, fsdp=-1, tensor=2), 8) == (2, 2, 2)
    with pytest.raises(ValueError, match=r"does not fit 8 devices; each size must be >= 1 \(or -1: the rest\) "
                                         "and their product must divide 8: 1, 2, 4, 8"):
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
    return stdlib_slice(tmp_path_factory.mktemp("corpus"))


def _train_argv(corpus, preset, objective, shape, workdir):
    return [f"model={preset}", "model.vocab_size=259", "model.d_model=32", "model.n_layers=2", "model.n_heads=4",
            "model.max_len=32", "model.dropout=0", "model.attention_dropout=0", "data.seq_len=32",
            "data.batch_size=8", f"data.path={corpus / 'text'}", f"data.data_dir={corpus / 'cache'}",
            f"train.objective={objective}", "train.steps=8", "train.eval_every=0", "train.save_every=4",
            f"train.workdir={workdir}", f"mesh.data={shape[0]}", f"mesh.fsdp={shape[1]}", f"mesh.tensor={shape[2]}"]


@pytest.fixture(scope="module")
def trained(small_corpus, tmp_path_factory):
    """trained(preset, objective, shape) -> workdir of an 8-step run on that mesh, saved at steps 4 and
    8 (one run per module: the (2, 2, 2) GPT-2 run serves both the mesh and the resume test). Read only."""
    from jaxlm.config import load_config
    from jaxlm.train import train

    cache = {}

    def run(preset, objective, shape):
        key = (preset, objective, tuple(shape))
        if key not in cache:
            w = tmp_path_factory.mktemp(f"{preset}-{'x'.join(map(str, shape))}")
            train(load_config(None, _train_argv(small_corpus, preset, objective, shape, w)), log=lambda m: None)
            cache[key] = w
        return cache[key]

    return run


def _losses(workdir):
    import json

    return [json.loads(x)["loss"] for x in open(workdir / "metrics.jsonl")]


# Each mesh shape is checked with one of the two models (the forward test above has every pair).
@pytest.mark.parametrize("preset, objective, shapes", [("gpt2-tiny", "clm", [(2, 2, 2), (1, 8, 1)]),
                                                       ("bert-tiny", "mlm", [(8, 1, 1), (1, 2, 4)])])
def test_training_on_meshes_matches_one_device(trained, preset, objective, shapes):
    base = _losses(trained(preset, objective, (1, 1, 1)))  # one device
    assert len(base) == 8
    for shape in shapes:
        np.testing.assert_allclose(_losses(trained(preset, objective, shape)), base, rtol=1e-5)


# Snapshot: every parameter and optimizer-state leaf's PartitionSpec under (2, 2, 2) -----------

GOLDEN = __import__("pathlib").Path(__file__).parent / "golden" / "sharding_2x2x2.txt"


def _sharding_table() -> str:
    """'path shape spec' per leaf of params and AdamW state, for GPT-2 small and BERT base."""
    from jaxlm.config import OptimConfig
    from jaxlm.optim import make_optimizer
    from jaxlm.sharding import like_params
    from jaxlm.transformer import abstract_params

    mesh = make_mesh(MeshConfig(2, 2, 2))
    lines = []
    # The Llama-layout parameter kinds: gate kernels and an untied head (llama3-8b), q/k/v biases
    # (qwen2.5), per-head q/k norms (qwen3), sandwich norms (gemma2).
    for preset in ("gpt2", "bert-base-uncased", "llama3-8b", "qwen2.5-0.5b", "qwen3-0.6b", "gemma2-2b"):
        cfg = ModelConfig.preset(preset)
        p_shard = param_shardings(cfg, mesh)
        params = abstract_params(cfg)
        opt = jax.eval_shape(make_optimizer(OptimConfig(), 100).init, params)
        o_shard = like_params(opt, p_shard, mesh)
        for title, tree, shard in (("params", params, p_shard), ("opt_state", opt, o_shard)):
            lines.append(f"# {preset} {title}")
            for (path, leaf), s in zip(jax.tree_util.tree_leaves_with_path(tree), jax.tree.leaves(shard)):
                lines.append(f"{jax.tree_util.keystr(path, simple=True, separator='/')} "
                             f"{tuple(leaf.shape)} {s.spec}")
    return "\n".join(lines) + "\n"


def test_sharding_snapshot_gpt2_and_bert_on_2x2x2():
    """Regenerate after a deliberate change of the rules: JAXLM_UPDATE_GOLDEN=1 pytest -k snapshot."""
    import difflib
    import os

    table = _sharding_table()
    if os.environ.get("JAXLM_UPDATE_GOLDEN"):
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(table)
    want = GOLDEN.read_text()
    diff = "".join(difflib.unified_diff(want.splitlines(True), table.splitlines(True), "checked in", "now", n=0))
    assert table == want, diff[:4000]
    # Spot checks of what the table must say, whatever was checked in.
    assert "gpt2 params" in want and "bert-base-uncased opt_state" in want
    assert "layers/blocks/attn/q/kernel (12, 768, 12, 64) P(None, 'fsdp', 'tensor', None)" in want
    assert "embed/tokens/embedding (50257, 768) P(None, 'fsdp')" in want  # 50257 is odd
    assert "embed/tokens/embedding (30522, 768) P('tensor', 'fsdp')" in want
    assert "layers/blocks/mlp/gate/kernel (32, 4096, 14336) P(None, 'fsdp', 'tensor')" in want
    assert "layers/blocks/attn/k/kernel (32, 4096, 8, 128) P(None, 'fsdp', 'tensor', None)" in want  # 8 kv heads
    assert "layers/blocks/attn/q_norm/scale (28, 128) P(None, None)" in want


def test_bad_mesh_fails_before_compiling(small_corpus, tmp_path):
    from jaxlm.config import load_config
    from jaxlm.train import train

    base = ["model=gpt2-tiny", "model.vocab_size=259", "model.d_model=48", "model.n_layers=1", "model.n_heads=6",
            "model.max_len=32", "data.seq_len=32", "data.batch_size=12", f"data.path={small_corpus / 'text'}",
            f"data.data_dir={small_corpus / 'cache'}", f"train.workdir={tmp_path / 'w'}"]
    cases = [(["mesh.data=3"], r"does not fit 8 devices; each size must be >= 1 \(or -1: the rest\) and their "
                               "product must divide 8: 1, 2, 4, 8"),
             (["mesh.data=8"], r"data.batch_size=12 does not split over mesh.data x mesh.fsdp = 8 devices; "
                               "use a multiple of 8"),
             (["mesh.data=1", "mesh.tensor=4"], "model.n_heads=6 is not divisible by mesh.tensor=4; use a "
                                                "tensor size that divides it: 1, 2, 3, 6")]
    for extra, message in cases:
        with pytest.raises(ValueError, match=message):
            train(load_config(None, base + extra), log=lambda m: None)
        assert not (tmp_path / "w").exists()  # refused before anything was written


@pytest.mark.parametrize("preset, shape", [("gpt2-tiny", (1, 1, 4)), ("gpt2-tiny", (2, 1, 2)),
                                           ("llama-tiny", (1, 1, 2)), ("gemma2-tiny", (1, 1, 2))])
def test_greedy_generation_under_tensor_parallel_equals_one_device(preset, shape):
    from jaxlm.api import LM

    cfg = ModelConfig.preset(preset, **{**SMALL, "max_len": 64}).replace(scan_layers=False)
    params = nnx.to_pure_dict(nnx.state(build_model(cfg), nnx.Param))
    prompts = [[1, 2, 3, 4, 5], [7, 8, 9], [10, 11, 12, 13, 14, 15, 16]]
    want = LM(cfg, params).generate(prompts, max_new_tokens=24)
    lm = LM(cfg, params, mesh=MeshConfig(*shape))
    assert lm.params["layers"]["blocks"][0]["attn"]["q"]["kernel"].sharding.spec == P(None, "tensor", None)
    np.testing.assert_array_equal(lm.generate(prompts, max_new_tokens=24), want)
    np.testing.assert_allclose(np.asarray(lm.logits(prompts[0])), np.asarray(LM(cfg, params).logits(prompts[0])),
                               atol=1e-5)


def test_checkpoint_of_2x2x2_resumes_on_1x8x1_and_on_one_device(trained, small_corpus, tmp_path):
    """Train 8 steps on (2, 2, 2) saving at 4 and 8; from the step-4 checkpoint, resume on (1, 8, 1)
    in this process and on one device in a fresh process: steps 5..8 repeat the losses."""
    import os
    import shutil
    import subprocess
    import sys

    import jaxlm
    from jaxlm.config import load_config
    from jaxlm.train import train

    full = trained("gpt2-tiny", "clm", (2, 2, 2))
    for name in ("on_1x8x1", "on_one_device"):
        shutil.copytree(full, tmp_path / name)
        shutil.rmtree(tmp_path / name / "checkpoints" / "8")  # as if the run had stopped after step 4
    train(load_config(None, _train_argv(small_corpus, "gpt2-tiny", "clm", (1, 8, 1), tmp_path / "on_1x8x1")),
          log=lambda m: None)
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count=1 {TEST_XLA_FLAGS}"}
    # The run's own config.json as the config file, with another workdir and mesh.
    run = subprocess.run([sys.executable, "-m", "jaxlm.cli", "train", "--config", str(full / "config.json"),
                          f"train.workdir={tmp_path / 'on_one_device'}", "mesh.data=1", "mesh.fsdp=1", "mesh.tensor=1"],
                         env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "resumed from" in run.stderr and "checkpoints/4" in run.stderr
    for name in ("on_1x8x1", "on_one_device"):
        assert len(_losses(tmp_path / name)) == 8
        np.testing.assert_allclose(_losses(tmp_path / name), _losses(full), rtol=1e-5)

    # jaxlm.load puts the (2, 2, 2) run's parameters on one device, or on a mesh of our choice.
    one, tp = jaxlm.load(full), jaxlm.load(full, mesh=MeshConfig(1, 1, 4))
    assert all(len(x.sharding.device_set) == 1 for x in jax.tree.leaves(one.params))
    ids = np.arange(1, 20)[None]
    np.testing.assert_allclose(np.asarray(tp.logits(ids)), np.asarray(one.logits(ids)), atol=1e-5)

    # Evaluation and generation take a mesh too (mesh.* settings), with the one-device results.
    from jaxlm.report import evaluate_model

    on_one = evaluate_model(full, batches=2)
    on_mesh = evaluate_model(full, ["mesh.data=2", "mesh.tensor=2"], batches=2)
    assert on_mesh["tokens"] == on_one["tokens"]
    np.testing.assert_allclose(on_mesh["loss"], on_one["loss"], rtol=1e-5)
    np.testing.assert_array_equal(tp.generate([[5, 6, 7]], max_new_tokens=8), one.generate([[5, 6, 7]], max_new_tokens=8))
