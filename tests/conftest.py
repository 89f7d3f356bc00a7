"""Shared fixtures: Hugging Face models with random weights, written once per session to a temp dir."""

import json
import os

# Tests that need several devices run on 8 simulated CPU devices; this must precede JAX's backend init.
# The suite's programs are tiny and mostly run a few times, so compiling dominates: LLVM's -O0 instead
# of -O3, without its expensive passes, and XLA:CPU's older elemental emitters instead of its fusion
# emitters cut the compile time of a tiny model's train step from ~4.7 s to ~1.2 s (runs get ~30%
# slower) and change results only in the last bits, which no test relies on across settings
# (benchmarks and users get XLA's defaults).
TEST_XLA_FLAGS = ("--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true "
                  "--xla_cpu_use_fusion_emitters=false")
os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count=8 {TEST_XLA_FLAGS}")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One XLA compilation cache for this test session, shared with the subprocesses tests start: many
# tests (and the processes of the resume tests) compile the same small programs.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaxlm-tests-xla-cache-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], True)
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"

import subprocess  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402


# Garbage collection. A worker's heap holds what collection imported (jax, flax, transformers,
# torch: millions of objects that live to the end) and grows with the jit caches, so each full
# collection took ~0.5 s, and pytest's five at the session's end (looking for unraisable
# exceptions) ~5 s per worker: ~36 s of the suite's CPU time. Frozen objects are never scanned
# (gc.freeze); full collections come 10x less often (young ones as before); the session's end
# scans nothing (a cycle still alive then goes unreported if its __del__ raises). Measured: 36 -> 10 s
# of collections, the suite ~8% faster.
def pytest_collection_finish(session):
    import gc

    gc.freeze()
    gc.set_threshold(700, 10, 100)


def pytest_sessionfinish(session):
    import gc

    gc.freeze()


@pytest.fixture(scope="session")
def hf_dir(tmp_path_factory):
    """hf_dir(architecture, size="tiny") -> path of a saved random HF model (cached per session)."""
    cache = {}

    def make(architecture, size="tiny", **config):
        key = (architecture, size, json.dumps(config, sort_keys=True))
        if key not in cache:
            from jaxlm.testing import save_random_hf

            dst = tmp_path_factory.mktemp(f"{architecture}-{size}")
            # Moderately large init keeps logits peaked (greedy tokens are not near-ties) without
            # overflowing the 12-layer shapes.
            config.setdefault("init_range", 0.2 if size == "tiny" else 0.05)
            cache[key] = save_random_hf(architecture, dst, size=size, **config)
        return cache[key]

    return make


@pytest.fixture
def cli(capfd):
    """cli(*args) -> CompletedProcess of `jaxlm ARGS` run in this process, its output captured at the
    file-descriptor level (C++ and logging output counts too). For error paths, which need no fresh
    process (a fresh one costs ~2.5 s of imports); tests that kill or resume start real ones."""
    from jaxlm.cli import main

    def run(*args):
        capfd.readouterr()
        try:
            code = main([str(a) for a in args])
        except SystemExit as e:
            code = e.code
        out, err = capfd.readouterr()
        return subprocess.CompletedProcess(["jaxlm", *map(str, args)], code, out, err)

    return run


def stdlib_slice(root, n=30):
    """ROOT/text holding the first n top-level .py files of the standard library (a small corpus)."""
    import shutil

    from jaxlm.data import stdlib_dir

    (root / "text").mkdir()
    for f in sorted(stdlib_dir().glob("*.py"))[:n]:
        shutil.copy(f, root / "text" / f.name)
    return root


def ragged_batch(vocab, lengths, total=None, seed=0, left=False):
    """Token ids [B, T] and a padding mask for rows of the given lengths (right padding by default)."""
    rng = np.random.RandomState(seed)
    total = total or max(lengths)
    ids = rng.randint(0, vocab, (len(lengths), total))
    mask = np.zeros((len(lengths), total), np.int64)
    for i, n in enumerate(lengths):
        if left:
            mask[i, total - n:] = 1
        else:
            mask[i, :n] = 1
    return ids, mask


@pytest.fixture(scope="session")
def tiny_byte_model(tmp_path_factory):
    """A jaxlm model dir: a 2-layer GPT-2-shaped decoder (random weights) with the byte tokenizer."""
    from flax import nnx

    from jaxlm import ModelConfig, build_model
    from jaxlm.io import save_model
    from jaxlm.tokenizer import ByteTokenizer

    cfg = ModelConfig.preset("gpt2-tiny", vocab_size=259, max_len=64, d_model=32, n_layers=2, n_heads=4,
                             eos_token_id=ByteTokenizer.eos_id, pad_token_id=ByteTokenizer.pad_id)
    d = tmp_path_factory.mktemp("tiny-byte") / "model"
    save_model(d, cfg, nnx.to_pure_dict(nnx.state(build_model(cfg), nnx.Param)), ByteTokenizer())
    return str(d)
