"""jaxlm -> Hugging Face: byte-identical round trips for every family, transformers loads what we
write (logits within 1e-4), bfloat16 kept bit for bit, shards with an index, bad input refused."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors import safe_open

import jaxlm
from jaxlm.io import export
from jaxlm.io.hf import convert

from conftest import ragged_batch

TOL = 1e-4
ARCHITECTURES = ["GPT2LMHeadModel", "BertModel", "BertForMaskedLM", "BertForSequenceClassification",
                 "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                 "GemmaForCausalLM", "Gemma2ForCausalLM"]


def tensors(directory) -> dict:
    out = {}
    for f in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(str(f), framework="np") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def hf_output(path, arch, ids, mask):
    model = getattr(transformers, arch).from_pretrained(path, attn_implementation="eager").eval()
    with torch.no_grad():
        out = model(torch.tensor(ids), attention_mask=torch.tensor(mask))
    return (out.last_hidden_state if arch == "BertModel" else out.logits).numpy()


def assert_same_tensors(a_dir, b_dir):
    a, b = tensors(a_dir), tensors(b_dir)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert a[name].tobytes() == b[name].tobytes(), name


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_hf_jaxlm_hf_round_trip(hf_dir, tmp_path, arch):
    """HF -> jaxlm (convert) -> HF (export): the same tensor names and bytes (tied output matrices
    are absent on both sides), and transformers' outputs from the export equal jaxlm's."""
    src = hf_dir(arch)
    convert(src, tmp_path / "jax")
    export(tmp_path / "jax", tmp_path / "out")
    assert_same_tensors(src, tmp_path / "out")
    lm = jaxlm.load(tmp_path / "jax")
    ids, mask = ragged_batch(lm.config.vocab_size, [20, 7], seed=2)
    ours = np.asarray(lm.hidden_states(ids, mask) if arch == "BertModel" else lm.logits(ids, mask))
    theirs = hf_output(tmp_path / "out", arch, ids, mask)
    diff = np.abs(ours - theirs)
    err = diff[mask.astype(bool)].max() if diff.ndim == 3 else diff.max()
    print(f"{arch}: max abs err {err:.2e}")
    assert err <= TOL
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["architectures"] == [arch] and saved["dtype"] == "float32"
    assert (tmp_path / "out" / "generation_config.json").is_file()


def test_bfloat16_round_trips_bit_for_bit(tmp_path):
    """A bfloat16 checkpoint stays bfloat16 through jaxlm (not widened to float32 on disk)."""
    from jaxlm.testing import save_random_hf

    src = save_random_hf("LlamaForCausalLM", tmp_path / "f32")
    transformers.LlamaForCausalLM.from_pretrained(src).to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    convert(tmp_path / "bf16", tmp_path / "jax")
    export(tmp_path / "jax", tmp_path / "out")
    assert_same_tensors(tmp_path / "bf16", tmp_path / "out")
    assert {t.dtype.name for t in tensors(tmp_path / "out").values()} == {"bfloat16"}
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"
    # --dtype casts: float32 weights exported as bfloat16 equal transformers' own cast.
    export(src, tmp_path / "cast", dtype="bfloat16")
    assert_same_tensors(tmp_path / "bf16", tmp_path / "cast")


def test_sharded_export_writes_an_index_transformers_reads(hf_dir, tmp_path):
    src = hf_dir("LlamaForCausalLM")
    export(src, tmp_path / "out", max_shard_size="100KB")
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in (tmp_path / "out").glob("*.safetensors"))
    assert len(files) > 2 and sorted(set(index["weight_map"].values())) == files
    assert files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert all(f.stat().st_size <= 100_000 + 10_000 for f in (tmp_path / "out").glob("*.safetensors")
               if len(safe_open(str(f), framework="np").keys()) > 1)  # one tensor may exceed it alone
    assert_same_tensors(src, tmp_path / "out")
    ids, mask = ragged_batch(512, [9, 4], seed=1)
    real = mask.astype(bool)
    np.testing.assert_allclose(hf_output(tmp_path / "out", "LlamaForCausalLM", ids, mask)[real],
                               np.asarray(jaxlm.load(src).logits(ids, mask))[real], atol=TOL)


def test_bad_export_input_is_one_line_and_writes_nothing(cli, hf_dir, tmp_path):
    from jaxlm.compress.quantize import quantize_int8

    src = hf_dir("GPT2LMHeadModel")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    lm = jaxlm.load(src)
    jaxlm.LM(*quantize_int8(lm.config, lm.params), lm.tokenizer).save(tmp_path / "int8")
    cfg = lm.config.replace(head="classify", num_labels=3)  # GPT-2 with a classifier: no HF form here
    jaxlm.LM(cfg, nnx.to_pure_dict(nnx.state(jaxlm.build_model(cfg), nnx.Param))).save(tmp_path / "cls")
    for args, message in [
        ((src, tmp_path / "full"), "exists and is not empty; pass --overwrite"),
        ((src, tmp_path / "x", "--max-shard-size", "lots"), r"--max-shard-size='lots' is not a size; write e.g. 5GB"),
        ((tmp_path / "int8", tmp_path / "x"), "int8 / low-rank factored kernels have no Hugging Face form"),
        ((tmp_path / "cls", tmp_path / "x"), "gpt2 has no Hugging Face tensor for parameter classifier.bias"),
        ((src, tmp_path / "x", "--peft"), "--peft: .* has no LoRA adapters"),
    ]:
        r = cli("export", *args)
        lines = [x for x in r.stderr.splitlines() if x.strip()]
        assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
        assert re.search(message, lines[0]), lines[0]
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine" and not (tmp_path / "x").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp dirs left
