"""ModelConfig: presets agree with Hugging Face's configs; bad values get one clear message."""

import pytest
import transformers

from jaxlm import ModelConfig
from jaxlm.config import PRESETS, load_config


@pytest.mark.parametrize("preset, hf", [
    ("gpt2", transformers.GPT2Config()),
    ("gpt2-medium", transformers.GPT2Config(n_embd=1024, n_layer=24, n_head=16)),
    ("gpt2-large", transformers.GPT2Config(n_embd=1280, n_layer=36, n_head=20)),
    ("gpt2-xl", transformers.GPT2Config(n_embd=1600, n_layer=48, n_head=25)),
    ("bert-base-uncased", transformers.BertConfig(architectures=["BertForMaskedLM"])),
    ("bert-large-uncased", transformers.BertConfig(architectures=["BertForMaskedLM"], hidden_size=1024,
                                                   num_hidden_layers=24, num_attention_heads=16,
                                                   intermediate_size=4096)),
])
def test_presets_match_hf_configs(preset, hf):
    ours = ModelConfig.preset(preset)
    theirs = ModelConfig.from_hf(hf.to_dict()).replace(name=preset)
    assert ours == theirs


def test_hf_round_trip_and_dict_round_trip():
    for name in PRESETS:
        cfg = ModelConfig.preset(name)
        assert ModelConfig.from_dict(cfg.to_dict()) == cfg
        assert ModelConfig.from_hf(cfg.to_hf()).replace(name=name) == cfg


def test_derived_values():
    cfg = ModelConfig.preset("gpt2", n_kv_heads=4)
    assert (cfg.kv_heads, cfg.dim_per_head, cfg.mlp_dim, cfg.causal) == (4, 64, 3072, True)
    assert not ModelConfig.bert_base().causal


def test_unsupported_hf_models_are_named():
    with pytest.raises(ValueError, match=r"unsupported architecture \? \(model_type 'llama'\); supported: GPT2LMHeadModel, GPT2Model, BertModel"):
        ModelConfig.from_hf({"model_type": "llama"})
    with pytest.raises(ValueError, match=r"unsupported architecture BertForQuestionAnswering \(model_type 'bert'\); supported: .*BertForMaskedLM"):
        ModelConfig.from_hf({"model_type": "bert", "architectures": ["BertForQuestionAnswering"]})
    with pytest.raises(ValueError, match="scale_attn_by_inverse_layer_idx"):
        ModelConfig.from_hf({"model_type": "gpt2", "scale_attn_by_inverse_layer_idx": True})


def test_config_validation_messages():
    with pytest.raises(ValueError, match=r"norm='batchnorm' is not one of layernorm, rmsnorm"):
        ModelConfig(norm="batchnorm")
    with pytest.raises(ValueError, match="d_model=100 is not divisible by n_heads=12"):
        ModelConfig(d_model=100)
    with pytest.raises(ValueError, match=r"unknown model preset 'gpt3'.*did you mean 'gpt2'"):
        ModelConfig.preset("gpt3")
    with pytest.raises(ValueError, match=r"unknown ModelConfig field 'n_layer'.*'n_layers'"):
        ModelConfig.from_dict({"n_layer": 2})


@pytest.mark.parametrize("name", ["quickstart", "gpt2_small", "bert_base_mlm"])
def test_shipped_configs_load(name):
    from jaxlm.config import load_config

    cfg = load_config(f"configs/{name}.yaml", ["train.steps=7"])
    assert cfg.train.steps == 7 and cfg.data.seq_len <= cfg.model.max_len


def test_a_runs_config_json_is_a_config_file(tmp_path):
    """JSON floats like 1e-05 (YAML 1.1 strings) read as numbers: config.json of a run reloads as is."""
    import json

    cfg = load_config(None, ["model=bert-tiny", "optim.lr=3e-4", "mesh.tensor=2"])
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    assert load_config(tmp_path / "config.json") == cfg
    (tmp_path / "c.yaml").write_text("model:\n  norm_eps: 1e-6\noptim:\n  lr: 2E-3\n")
    got = load_config(tmp_path / "c.yaml")
    assert got.model.norm_eps == 1e-6 and got.optim.lr == 2e-3
