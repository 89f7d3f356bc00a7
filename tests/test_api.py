"""jaxlm.load and the LM surface: inputs checked, save/load round trip, runtime overrides."""

import numpy as np
import pytest

import jaxlm

from conftest import ragged_batch


@pytest.fixture(scope="module")
def gpt2(hf_dir):
    return jaxlm.load(hf_dir("GPT2LMHeadModel"))


def test_shapes_and_tokenizer(gpt2):
    ids = gpt2.tokenizer.encode("Hello, world")
    assert gpt2.logits(ids).shape == (1, len(ids), 50257)
    assert gpt2.hidden_states([ids, ids]).shape == (2, len(ids), 64)
    assert "GPT2LMHeadModel" not in repr(gpt2) and "M params" in repr(gpt2)


def test_ids_outside_vocab_and_too_long_raise(gpt2):
    with pytest.raises(ValueError, match=r"input id 50257 is outside the vocabulary: ids must be in \[0, 50257\)"):
        gpt2.logits([[1, 2, 50257]])
    with pytest.raises(ValueError, match=r"input id -1 is outside the vocabulary"):
        gpt2.hidden_states([[-1, 2]])
    with pytest.raises(ValueError, match="sequence length 129 exceeds the model's context of 128 tokens"):
        gpt2.logits(np.zeros((1, 129), int))
    with pytest.raises(ValueError, match="input_ids must be integers"):
        gpt2.logits(np.zeros((1, 3), np.float32))


def test_save_load_round_trip(gpt2, tmp_path):
    gpt2.save(tmp_path / "m")
    again = jaxlm.load(tmp_path / "m")
    ids, mask = ragged_batch(50257, [7, 3], seed=0)
    np.testing.assert_array_equal(np.asarray(gpt2.logits(ids, mask)), np.asarray(again.logits(ids, mask)))
    assert again.tokenizer.encode("héllo") == gpt2.tokenizer.encode("héllo")
    with pytest.raises(FileExistsError, match="exists and is not empty; pass --overwrite"):
        gpt2.save(tmp_path / "m")


def test_model_dirs_store_layers_apart_and_read_the_stacked_layout(gpt2, tmp_path):
    import shutil

    import orbax.checkpoint.experimental.v1 as ocp

    from jaxlm.io.model_dir import param_metadata, read_model_dir
    from jaxlm.transformer import stack_layers

    gpt2.save(tmp_path / "m")
    stored = param_metadata(tmp_path / "m" / "params")
    n = gpt2.config.n_layers
    assert {k.split(".")[2] for k in stored if k.startswith("layers.blocks.")} == {str(i) for i in range(n)}
    assert stored["layers.blocks.0.attn.q.kernel"][0] == (64, 4, 16)  # one layer: no layers axis
    # A dir written by an earlier version: one array per parameter with a leading layers axis (and
    # no checksums).
    shutil.copytree(tmp_path / "m", tmp_path / "old", ignore=shutil.ignore_patterns("params", "checksums.json"))
    _, params, _ = read_model_dir(tmp_path / "m")
    ocp.save((tmp_path / "old" / "params").absolute(), stack_layers(params))
    assert param_metadata(tmp_path / "old" / "params")["layers.blocks.attn.q.kernel"][0] == (n, 64, 4, 16)
    ids, mask = ragged_batch(50257, [7, 3], seed=0)
    np.testing.assert_array_equal(np.asarray(jaxlm.load(tmp_path / "old").logits(ids, mask)),
                                  np.asarray(gpt2.logits(ids, mask)))


def test_runtime_overrides_keep_results(hf_dir):
    path = hf_dir("BertForMaskedLM")
    ids, mask = ragged_batch(1000, [9, 4], seed=1)
    base = np.asarray(jaxlm.load(path).logits(ids, mask))
    for kw in (dict(scan_layers=False), dict(remat=True), dict(attention_impl="einsum")):
        np.testing.assert_allclose(np.asarray(jaxlm.load(path, **kw).logits(ids, mask)), base, atol=2e-5)
    with pytest.raises(ValueError, match="load\\(\\) can override only .*; got 'n_layers'"):
        jaxlm.load(path, n_layers=1)


def test_load_bad_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        jaxlm.load(tmp_path / "nope")
    with pytest.raises(ValueError, match="holds no model"):
        jaxlm.load(tmp_path)


def test_encoder_without_head_says_so(hf_dir):
    lm = jaxlm.load(hf_dir("BertModel"))
    with pytest.raises(ValueError, match="no output head"):
        lm.logits([[1, 2, 3]])
