"""Hugging Face import: config mapping, parity with transformers (PyTorch) on the same weights, bad input."""

import json
import shutil

import numpy as np
import pytest
import torch
import transformers

import jaxlm
import jaxlm.cli
from jaxlm import ModelConfig
from jaxlm.config import PRESETS
from jaxlm.io.hf import config_from_hf, config_to_hf, hf_to_params
from jaxlm.testing import minilm_dir

from conftest import ragged_batch

TOL = 1e-4


@pytest.mark.parametrize("preset, hf", [
    ("gpt2", transformers.GPT2Config()),
    ("gpt2-medium", transformers.GPT2Config(n_embd=1024, n_layer=24, n_head=16)),
    ("gpt2-large", transformers.GPT2Config(n_embd=1280, n_layer=36, n_head=20)),
    ("gpt2-xl", transformers.GPT2Config(n_embd=1600, n_layer=48, n_head=25)),
    ("bert-base-uncased", transformers.BertConfig(architectures=["BertForMaskedLM"])),
    ("bert-large-uncased", transformers.BertConfig(architectures=["BertForMaskedLM"], hidden_size=1024,
                                                   num_hidden_layers=24, num_attention_heads=16,
                                                   intermediate_size=4096)),
    # The published shapes of the Llama-layout families, spelled with transformers' config classes.
    ("llama3-8b", transformers.LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, max_position_embeddings=8192, rms_norm_eps=1e-5, bos_token_id=128000,
        eos_token_id=128001, rope_parameters={"rope_type": "default", "rope_theta": 500000.0})),
    ("llama3.2-1b", transformers.LlamaConfig(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, head_dim=64, max_position_embeddings=131072, rms_norm_eps=1e-5, bos_token_id=128000,
        eos_token_id=128001, tie_word_embeddings=True, rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})),
    ("mistral-7b", transformers.MistralConfig(max_position_embeddings=32768, rms_norm_eps=1e-5)),
    ("qwen2.5-0.5b", transformers.Qwen2Config(
        vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
        num_key_value_heads=2, max_position_embeddings=32768, tie_word_embeddings=True, bos_token_id=151643,
        eos_token_id=151643, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
    ("qwen3-0.6b", transformers.Qwen3Config(
        vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
        num_key_value_heads=8, head_dim=128, max_position_embeddings=40960, tie_word_embeddings=True,
        bos_token_id=151643, eos_token_id=151645, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
    ("gemma-2b", transformers.GemmaConfig(hidden_size=2048, intermediate_size=16384, num_hidden_layers=18,
                                          num_attention_heads=8, num_key_value_heads=1, head_dim=256)),
    ("gemma2-2b", transformers.Gemma2Config()),
])
def test_presets_match_hf_configs(preset, hf):
    ours = ModelConfig.preset(preset)
    theirs = config_from_hf(hf.to_dict()).replace(name=preset)
    assert ours == theirs


def test_hub_style_config_reads_rope_theta_and_rope_scaling():
    """Hub config.json files still say rope_theta + rope_scaling (transformers 5: rope_parameters)."""
    hub = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 128256, "hidden_size": 2048,
           "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
           "head_dim": 64, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "hidden_act": "silu",
           "tie_word_embeddings": True, "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009],
           "rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}
    assert config_from_hf(hub).replace(name="llama3.2-1b") == ModelConfig.preset("llama3.2-1b")
    with pytest.raises(ValueError, match="RoPE scaling 'yarn' is not supported; supported: default, linear, llama3"):
        config_from_hf({**hub, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})


def test_hf_round_trip_and_dict_round_trip():
    for name in PRESETS:
        cfg = ModelConfig.preset(name)
        assert ModelConfig.from_dict(cfg.to_dict()) == cfg
        assert config_from_hf(config_to_hf(cfg)).replace(name=name) == cfg


def test_unsupported_hf_models_are_named():
    with pytest.raises(ValueError, match=r"unsupported architecture \? \(model_type 'falcon'\); supported: GPT2LMHeadModel, GPT2Model, BertModel"):
        config_from_hf({"model_type": "falcon"})
    with pytest.raises(ValueError, match="llama config.json lacks 'hidden_size'"):
        config_from_hf({"model_type": "llama"})
    with pytest.raises(ValueError, match=r"unsupported architecture BertForQuestionAnswering \(model_type 'bert'\); supported: .*BertForMaskedLM"):
        config_from_hf({"model_type": "bert", "architectures": ["BertForQuestionAnswering"]})
    with pytest.raises(ValueError, match="scale_attn_by_inverse_layer_idx"):
        config_from_hf({"model_type": "gpt2", "scale_attn_by_inverse_layer_idx": True})


def hf_outputs(path, ids, mask):
    config = transformers.AutoConfig.from_pretrained(path)
    model = getattr(transformers, config.architectures[0]).from_pretrained(path).eval()
    with torch.no_grad():
        return model(torch.tensor(ids), attention_mask=torch.tensor(mask))


def max_err(ours, ref, mask=None):
    diff = np.abs(np.asarray(ours, np.float64) - np.asarray(ref, np.float64))
    return diff[mask.astype(bool)].max() if mask is not None else diff.max()


# Every head at the tiny size; at full size (12 layers of 768) GPT-2's and BERT's language models,
# whose trunks the other heads share (those heads' own weights are checked at the tiny size).
@pytest.mark.parametrize("arch, size", [
    *((arch, "tiny") for arch in ("GPT2LMHeadModel", "GPT2Model", "BertModel", "BertForMaskedLM",
                                  "BertForSequenceClassification")),
    *(pytest.param(arch, "base", marks=pytest.mark.slow) for arch in ("GPT2LMHeadModel", "BertForMaskedLM"))])
def test_parity_with_transformers(hf_dir, arch, size):
    path = hf_dir(arch, size)
    lm = jaxlm.load(path)
    ids, mask = ragged_batch(lm.config.vocab_size, [17, 9, 4], seed=1)
    ref = hf_outputs(path, ids, mask)
    if arch in ("GPT2Model", "BertModel"):
        err = max_err(lm.hidden_states(ids, mask), ref.last_hidden_state, mask)
    elif arch == "BertForSequenceClassification":
        err = max_err(lm.logits(ids, mask), ref.logits)
    else:
        err = max_err(lm.logits(ids, mask), ref.logits, mask)
    print(f"{arch} {size}: max abs err {err:.2e}")
    assert err <= TOL


# The Llama-layout families: windows of 16 under rows of 40 tokens, Llama 3.1's RoPE bands with a
# short original context (so they move most frequencies), Gemma 2 with caps its values exceed.
DECODER_CASES = {
    "llama": ("LlamaForCausalLM", {}),
    "llama-rope-llama3": ("LlamaForCausalLM", dict(rope_parameters={
        "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64})),
    "mistral": ("MistralForCausalLM", {}),
    "qwen2": ("Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3ForCausalLM", {}),
    "gemma": ("GemmaForCausalLM", {}),
    "gemma2-capped": ("Gemma2ForCausalLM", dict(attn_logit_softcapping=5.0, final_logit_softcapping=3.0)),
}


def hf_decoder_logits(path, arch, ids, mask):
    model = getattr(transformers, arch).from_pretrained(path, attn_implementation="eager").eval()
    with torch.no_grad():
        return model(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()


@pytest.mark.parametrize("case", DECODER_CASES)
def test_decoder_family_parity_with_transformers(hf_dir, case):
    arch, config = DECODER_CASES[case]
    path = hf_dir(arch, **config)
    lm = jaxlm.load(path)
    ids, mask = ragged_batch(lm.config.vocab_size, [40, 23, 9], seed=1)
    ours = np.asarray(lm.logits(ids, mask))
    err = max_err(ours, hf_decoder_logits(path, arch, ids, mask), mask)
    print(f"{case}: max abs err {err:.2e}")
    assert err <= TOL
    cfg = lm.config
    assert cfg.sliding_window == (16 if arch in ("MistralForCausalLM", "Gemma2ForCausalLM") else None)

    def differs(**change):  # the same weights with one config field changed
        other = np.asarray(jaxlm.LM(cfg.replace(**change), lm.params).logits(ids, mask))
        return float(np.abs(other - ours)[mask.astype(bool)].max())

    if case == "llama-rope-llama3":
        assert cfg.rope_scaling == "llama3" and differs(rope_scaling="none") > 1e-3
    if case == "gemma2-capped":
        uncapped = np.asarray(jaxlm.LM(cfg.replace(final_softcap=None), lm.params).logits(ids, mask))
        assert np.abs(uncapped).max() > 3.0 >= np.abs(ours).max()  # logits beyond the cap before capping
        assert differs(attn_softcap=None) > 1e-3  # and the attention cap changes the result
    if cfg.sliding_window:
        assert differs(sliding_window=None, layer_types=()) > 1e-3  # rows of 40 reach past the window


def test_parity_real_pretrained_bert():
    """all-MiniLM-L6-v2: real trained weights and its tokenizer.json, text in, hidden states out."""
    path = minilm_dir()
    lm = jaxlm.load(path)
    texts = ["JAX compiles numerical programs.", "The quick brown fox jumps over the lazy dog!"]
    rows = [lm.tokenizer.encode(t) for t in texts]
    ids = np.zeros((2, max(map(len, rows))), np.int64)
    mask = np.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = r, 1
    ref = hf_outputs(path, ids, mask)
    assert max_err(lm.hidden_states(ids, mask), ref.last_hidden_state, mask) <= TOL


def test_sharded_safetensors_and_pytorch_bin(hf_dir, tmp_path):
    src = hf_dir("GPT2LMHeadModel")
    model = transformers.GPT2LMHeadModel.from_pretrained(src)
    sharded, pickled = tmp_path / "sharded", tmp_path / "bin"
    model.save_pretrained(sharded, max_shard_size="1MB")
    assert (sharded / "model.safetensors.index.json").is_file()
    pickled.mkdir()
    shutil.copy(src / "config.json", pickled)
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    _, want = hf_to_params(src)
    for d in (sharded, pickled):
        _, got = hf_to_params(d)
        for a, b in zip(jax_leaves(want), jax_leaves(got)):
            np.testing.assert_array_equal(a, b)


def test_index_naming_a_missing_shard_is_named(hf_dir, tmp_path, cli):
    sharded = tmp_path / "sharded"
    transformers.GPT2LMHeadModel.from_pretrained(hf_dir("GPT2LMHeadModel")).save_pretrained(sharded, max_shard_size="1MB")
    shards = sorted(sharded.glob("model-*.safetensors"))
    shards[1].unlink()
    proc = cli("convert", sharded, tmp_path / "out")
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert f"model.safetensors.index.json names {shards[1].name}, which is not in" in lines[0]
    assert not (tmp_path / "out").exists()


def test_tensor_missing_from_the_shards_is_named(hf_dir, tmp_path, cli):
    from safetensors.numpy import load_file, save_file

    sharded = tmp_path / "sharded"
    transformers.LlamaForCausalLM.from_pretrained(hf_dir("LlamaForCausalLM")).save_pretrained(sharded, max_shard_size="100KB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    gone = "model.layers.1.mlp.up_proj.weight"
    shard = sharded / index["weight_map"].pop(gone)
    save_file({k: v for k, v in load_file(str(shard)).items() if k != gone}, str(shard), metadata={"format": "pt"})
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    proc = cli("convert", sharded, tmp_path / "out")
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].endswith("checkpoint lacks layers.1.mlp.up_proj.weight") and not (tmp_path / "out").exists()


def jax_leaves(tree):
    import jax

    return jax.tree.leaves(tree)


def test_convert_then_load_matches_hf_dir(hf_dir, tmp_path):
    for arch in ("GPT2LMHeadModel", "BertForMaskedLM"):
        src, dst = hf_dir(arch), tmp_path / arch
        assert jaxlm.cli.main(["convert", str(src), str(dst)]) == 0
        ids, mask = ragged_batch(1000, [12, 5], seed=3)
        a, b = jaxlm.load(src), jaxlm.load(dst)
        assert b.config == a.config
        np.testing.assert_array_equal(np.asarray(a.logits(ids, mask)), np.asarray(b.logits(ids, mask)))
        assert b.tokenizer.encode("round trip é 字") == a.tokenizer.encode("round trip é 字")


def test_bad_weight_shape_names_tensor(hf_dir, tmp_path):
    src = tmp_path / "bad"
    shutil.copytree(hf_dir("GPT2LMHeadModel"), src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["n_inner"] = 128  # the file's MLP is 4 * 64 = 256 wide
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"h\.0\.mlp\.c_fc\.(weight|bias) has shape \((64, )?256,?\)"):
        hf_to_params(src)


def test_tied_weights_absent_and_buffers_skipped(hf_dir):
    from safetensors import safe_open

    src = hf_dir("BertForMaskedLM")
    with safe_open(str(src / "model.safetensors"), framework="np") as f:
        names = set(f.keys())
    assert "cls.predictions.decoder.weight" not in names  # tied: only the embedding is stored
    config, params = hf_to_params(src)
    assert "decoder" not in params["mlm"] and config.tie_embeddings
