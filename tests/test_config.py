"""ModelConfig: derived values, field kinds; bad values get one clear message."""

import pytest

from jaxlm import ModelConfig
from jaxlm.config import CHECKPOINT_FIELDS, FIELD_KINDS, RUNTIME_FIELDS, fields_of, load_config


def test_derived_values():
    cfg = ModelConfig.preset("gpt2", n_kv_heads=4)
    assert (cfg.kv_heads, cfg.dim_per_head, cfg.mlp_dim, cfg.causal) == (4, 64, 3072, True)
    assert not ModelConfig.bert_base().causal


def test_every_field_declares_its_kind_and_checks_derive_from_it():
    import dataclasses

    kinds = {f.name: f.metadata["kind"] for f in dataclasses.fields(ModelConfig)}
    assert set(kinds.values()) <= set(FIELD_KINDS) and len(kinds) == len(fields_of(*FIELD_KINDS))
    assert RUNTIME_FIELDS == ("dtype", "scan_layers", "remat", "attention_impl")
    # A resumed run keeps every field that shapes the parameters, the adapters, and the layout.
    assert set(fields_of("shape", "adapter")) | {"scan_layers"} == set(CHECKPOINT_FIELDS)
    assert {"d_model", "n_layers", "vocab_size", "norm", "lora_rank", "prompt_length"} <= set(CHECKPOINT_FIELDS)
    assert not {"dropout", "eos_token_id", "remat", "dtype", "activation"} & set(CHECKPOINT_FIELDS)
    with pytest.raises(ValueError, match="unknown field kind 'shapes'"):
        fields_of("shapes")
    a, b = ModelConfig.preset("gpt2-tiny"), ModelConfig.preset("gpt2-tiny", dropout=0.0, d_ff=128)
    assert a.first_difference(b, CHECKPOINT_FIELDS) == "d_ff" and a.first_difference(b, RUNTIME_FIELDS) is None


def test_paths_become_absolute_where_they_exist(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "base").mkdir()
    (tmp_path / "text").mkdir()
    cfg = load_config(None, ["adapt.init=base", "distill.teacher=./base", "data.path=text,more/*.txt,missing",
                             "data.data_dir=cache", "data.tokenizer=gpt2", "train.workdir=runs/x"]).with_absolute_paths()
    assert cfg.adapt.init == str(tmp_path / "base") and cfg.distill.teacher == str(tmp_path / "base")
    assert cfg.data.tokenizer == "gpt2"  # not a local path (a hub id stays as given)
    assert cfg.data.path == f"{tmp_path / 'text'},{tmp_path / 'more/*.txt'},missing"
    assert cfg.data.data_dir == str(tmp_path / "cache")
    assert cfg.train.workdir == "runs/x"  # the run's own directory, as given


def test_config_validation_messages():
    with pytest.raises(ValueError, match=r"norm='batchnorm' is not one of layernorm, rmsnorm"):
        ModelConfig(norm="batchnorm")
    with pytest.raises(ValueError, match="d_model=100 is not divisible by n_heads=12"):
        ModelConfig(d_model=100)
    with pytest.raises(ValueError, match=r"unknown model preset 'gpt3'.*did you mean 'gpt2'"):
        ModelConfig.preset("gpt3")
    with pytest.raises(ValueError, match=r"unknown ModelConfig field 'n_layer'.*'n_layers'"):
        ModelConfig.from_dict({"n_layer": 2})


@pytest.mark.parametrize("name", ["quickstart", "gpt2_small", "bert_base_mlm", "llama3.2_1b", "llama3_8b_lora",
                                  "mistral_7b_lora", "qwen2.5_0.5b", "qwen3_0.6b", "gemma_2b", "gemma2_2b"])
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
