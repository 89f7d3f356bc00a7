"""Property-based fuzzing (hypothesis) of input surfaces: the only outcomes allowed are a correct
result or a ValueError with one line. A fixed example budget per property keeps the suite's time
bounded; inputs that once found a bug stay as explicit examples."""

import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from jaxlm.config import load_config
from jaxlm.tokenizer import ByteTokenizer, load_tokenizer

BUDGET = settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
KEYS = ["model", "model.d_model", "model.n_layers", "model.lora_targets", "model.head_dim", "data.seq_len",
        "data.path", "data.data_dir", "train.steps", "train.objective", "optim.lr", "mesh.data", "data.packing",
        "dpo.beta", "adapt.method", "model.rope_scaling", "unknown", "model.nope", "train"]


def one_line_value_error(fn):
    try:
        out = fn()
    except (ValueError, FileNotFoundError) as e:
        assert str(e) and "\n" not in str(e), repr(str(e))
        event("one-line error: " + str(e)[:50])  # counted by --hypothesis-show-statistics
        return None
    event("result")
    return out


@BUDGET
@given(st.one_of(st.text(), st.builds("{}={}".format, st.sampled_from(KEYS), st.text())))
@example("model.d_model=")        # was: TypeError comparing '' with 1
@example("model.d_model=,")       # was: yaml ParserError (a traceback from the CLI)
@example("model.d_model=\x1f")    # was: yaml ReaderError
@example("\n=")                   # was: an error message with a line break
@example("data.path=yes")         # was: data.path=True (YAML 1.1 booleans)
def test_config_overrides_parse_or_fail_in_one_line(item):
    cfg = one_line_value_error(lambda: load_config(None, [item]))
    if cfg is not None and item.startswith("data.path="):
        assert cfg.data.path in (item.split("=", 1)[1], None)  # string fields keep the text as written


@BUDGET
@given(st.text())
@example("\ud800")  # a lone surrogate: not encodable as UTF-8
def test_byte_tokenizer_round_trips_any_text(text):
    tok = ByteTokenizer()
    ids = one_line_value_error(lambda: tok.encode(text))
    if ids is not None:
        assert all(0 <= i < 256 for i in ids) and tok.decode(ids) == text


@pytest.fixture(scope="module")
def gpt2_tokenizer(hf_dir):
    return load_tokenizer(hf_dir("GPT2LMHeadModel"))


@BUDGET
@given(text=st.text())
@example(text="\ud800")
@example(text="<|endoftext|> a")
def test_gpt2_bpe_round_trips_any_text(gpt2_tokenizer, text):
    ids = one_line_value_error(lambda: gpt2_tokenizer.encode(text, add_special_tokens=False))
    if ids is not None:
        assert gpt2_tokenizer.decode(ids, skip_special_tokens=False) == text


# MeshConfig against device counts -------------------------------------------------------------

@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.integers(-3, 17), st.integers(-3, 17), st.integers(-3, 17), st.integers(1, 8))
@example(4, 4, 1, 8)  # each size divides 8, their product does not
def test_mesh_sizes_fit_the_devices_or_fail_in_one_line(data, fsdp, tensor, n):
    import math

    import jax

    from jaxlm.config import MeshConfig
    from jaxlm.sharding import make_mesh

    mesh = one_line_value_error(lambda: make_mesh(MeshConfig(data, fsdp, tensor), jax.devices()[:n]))
    sizes = (data, fsdp, tensor)
    fits = sizes.count(-1) <= 1 and all(s >= 1 or s == -1 for s in sizes) and \
        n % math.prod(s for s in sizes if s != -1) == 0
    assert (mesh is not None) == fits, (sizes, n)
    if mesh is not None:
        shape = tuple(mesh.shape[a] for a in ("data", "fsdp", "tensor"))
        assert all(s == -1 or s == got for s, got in zip(sizes, shape)) and n % math.prod(shape) == 0
        assert -1 not in sizes or math.prod(shape) == n


# LM.logits inputs and LM.generate arguments ------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_lm(tiny_byte_model):
    import jaxlm

    return jaxlm.load(tiny_byte_model)


DTYPES = ["int8", "uint8", "int16", "int32", "int64", "uint64", "float32", "bool", "object"]


@settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(st.sampled_from(DTYPES), st.lists(st.integers(0, 4), min_size=0, max_size=3), st.integers(-3, 262),
       st.sampled_from([None, "ones", "zeros", "wrong shape", "float"]))
@example("int8", [0], 0, None)  # was: an empty input returned logits of shape (1, 0, 259)
def test_logits_inputs_give_logits_or_one_line_error(tiny_lm, dtype, shape, fill, mask):
    import numpy as np

    ids = np.full(shape, fill).astype(dtype) if dtype != "object" else np.full(shape, str(fill), dtype=object)
    masks = {None: None, "ones": np.ones(shape), "zeros": np.zeros(shape), "wrong shape": np.ones((7, 3)),
             "float": np.full(shape, 0.5)}
    out = one_line_value_error(lambda: tiny_lm.logits(ids, attention_mask=masks[mask]))
    if out is not None:  # a correct result: the logits of the same ids as int32 (unmasked: equal)
        assert out.shape == (1 if len(shape) == 1 else shape[0], shape[-1], 259)
        if mask in (None, "ones"):
            want = tiny_lm.logits(ids.astype(np.int32))
            np.testing.assert_array_equal(np.asarray(out), np.asarray(want))


def mostly(valid, *invalid):
    """Valid values seven times in eight: with seven arguments, about a third of the calls are
    valid throughout and must give a correct result."""
    return st.integers(0, 7).flatmap(lambda i: valid if i else st.sampled_from(invalid))


PROMPTS = mostly(st.lists(st.text(min_size=1, max_size=6), min_size=1, max_size=3),
                 [], None, "one string", [""], [[1, 2], [3]], [[]], [1.5], [["a"]], [[300]])


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(prompts=PROMPTS,
       max_new_tokens=mostly(st.integers(1, 3), -1, 0, 10 ** 6, 2.0, None, "2"),
       temperature=mostly(st.floats(0, 2), -1.0, float("nan"), float("inf"), None, "0.5"),
       top_k=mostly(st.integers(0, 259), -1, 260, 2.5, None),
       top_p=mostly(st.floats(0.01, 1), 0.0, 1.5, float("nan"), None),
       seed=mostly(st.integers(0, 2 ** 31 - 1), None, 1.5, "1"),
       n=mostly(st.integers(1, 2), 0, -3, None, 1.0),
       stop=st.one_of(st.none(), st.lists(st.text(max_size=2), max_size=2)))
def test_generate_arguments_give_text_or_one_line_error(tiny_lm, prompts, max_new_tokens, temperature, top_k,
                                                          top_p, seed, n, stop):
    out = one_line_value_error(lambda: tiny_lm.generate(prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                                                          top_k=top_k, top_p=top_p, seed=seed,
                                                          num_return_sequences=n, stop=stop))
    if out is not None:
        import numpy as np

        rows = len(prompts) * n
        if isinstance(out, list):
            assert len(out) == rows and all(isinstance(t, str) for t in out)
        else:
            assert np.asarray(out).shape[0] == rows


# The command line ----------------------------------------------------------------------------------

ARGV_WORDS = ["convert", "export", "merge", "generate", "serve", "train", "eval", "quantize", "prune", "lowrank",
              "plot", "--help", "--prompt", "--max-new-tokens", "--temperature", "--top-k", "--top-p", "--seed",
              "--num-return-sequences", "--stop", "--json", "--overwrite", "--dtype", "--rank", "--energy",
              "--sparsity", "--heads", "--scope", "--targets", "--max-shard-size", "--peft", "--split", "--batches",
              "--port", "--config", "--coordinator", "--num-processes", "--process-id", "-1", "0", "2", "0.5", "1e9",
              "nan", "float32", "layer", "mesh.tensor=3", "mesh.data=0", "model.d_model=x", "train.steps=-1",
              "data.path=", "=", "", "MODEL", "NOWHERE", "DST"]


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(st.lists(st.one_of(st.sampled_from(ARGV_WORDS), st.text(max_size=5)), max_size=7))
@example(["generate", "MODEL", "--prompt", "a", "--max-new-tokens", "2"])
@example(["quantize", "MODEL", "DST"])
@example(["generate"])  # was: usage lines before the error (argparse): now one line
def test_command_line_gives_a_result_or_one_line_exit_2(tiny_byte_model, tmp_path_factory, capsys, argv):
    """Any argument vector: exit 0, or exit 2 with one line on stderr (no traceback). MODEL is a
    real model dir, NOWHERE a missing path, DST a fresh directory; `serve` and `train` only ever
    get a missing model / a config that fails before any work (they would run for good)."""
    from jaxlm.cli import main

    dst = tmp_path_factory.mktemp("dst") / "out"
    words = {"MODEL": tiny_byte_model, "NOWHERE": str(dst.parent / "nowhere"), "DST": str(dst)}
    argv = [words.get(w, w) for w in argv]
    if argv and argv[0] in ("serve", "train") and "--help" not in argv:
        argv = [a if a != tiny_byte_model else words["NOWHERE"] for a in argv]
        if argv[0] == "train":
            argv.append(f"data.path={words['NOWHERE']}")
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as e:  # argparse: --help (0) or a usage error (2)
        code = e.code
    err = capsys.readouterr().err
    event(f"exit {code}")
    if "--help" in argv and code == 0:
        return
    assert code in (0, 2), (argv, code, err)
    if code == 2:
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and "Traceback" not in err, (argv, err)
