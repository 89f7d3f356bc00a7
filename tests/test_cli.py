"""The jaxlm command: conversion end to end, bad input as one line, no half-written output."""

import json
import re
import shutil
import subprocess
import sys

import pytest


def assert_one_line_error(proc, pattern):
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert re.search(pattern, lines[0]), lines[0]


def test_convert_script_and_command(hf_dir, tmp_path):
    src = hf_dir("GPT2LMHeadModel")
    proc = subprocess.run([sys.executable, "scripts/convert_hf.py", str(src), str(tmp_path / "a")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["checksums.json", "config.json", "merges.txt", "params",
                                                                  "vocab.json"]
    assert json.loads((tmp_path / "a" / "config.json").read_text())["format"] == "jaxlm-model-v1"


def test_missing_and_empty_sources(cli, tmp_path):
    assert_one_line_error(cli("convert", tmp_path / "nope", tmp_path / "out"), r"nope does not exist")
    (tmp_path / "empty").mkdir()
    assert_one_line_error(cli("convert", tmp_path / "empty", tmp_path / "out"),
                          r"holds no model: config.json not found")
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    assert_one_line_error(cli("convert", tmp_path / "cfg", tmp_path / "out"), r"holds no weights")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("damage", ["truncated", "header_size", "header_json"])
def test_damaged_safetensors_named_in_one_line_and_no_output(cli, hf_dir, tmp_path, damage):
    """safetensors checks its header and that the tensors cover the file exactly; jaxlm names the
    file in one line (a flipped byte inside a tensor has no checksum to fail: not detectable)."""
    src = tmp_path / "src"
    shutil.copytree(hf_dir("GPT2LMHeadModel"), src)
    f = src / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes({"truncated": data[:len(data) // 2], "header_size": b"\xff" * 8 + data[8:],
                   "header_json": data[:12] + b"#" + data[13:]}[damage])
    for argv in (("convert", src, tmp_path / "out"), ("generate", src, "--prompt", "a")):
        assert_one_line_error(cli(*argv), rf"{re.escape(str(f))} is damaged or not a safetensors file")
    assert not (tmp_path / "out").exists()


def test_unsupported_architecture_names_supported_ones(cli, tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"model_type": "falcon", "architectures": ["FalconForCausalLM"]}))
    assert_one_line_error(cli("convert", tmp_path / "m", tmp_path / "out"),
                          r"unsupported architecture FalconForCausalLM \(model_type 'falcon'\); supported: GPT2LMHeadModel, "
                          r"GPT2Model, BertModel, BertForMaskedLM, BertForSequenceClassification, LlamaForCausalLM, "
                          r"MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, GemmaForCausalLM, Gemma2ForCausalLM$")


def test_shape_mismatch_names_tensor_and_leaves_no_output(cli, hf_dir, tmp_path):
    src = tmp_path / "bad"
    shutil.copytree(hf_dir("BertForMaskedLM"), src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (src / "config.json").write_text(json.dumps(cfg))
    assert_one_line_error(cli("convert", src, tmp_path / "out"),
                          r"weight bert\.encoder\.layer\.0\.(intermediate|output)\.dense\.(weight|bias) has shape")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp dirs left


def test_non_empty_destination_refused_and_preserved(cli, hf_dir, tmp_path):
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "mine.txt").write_text("keep me")
    assert_one_line_error(cli("convert", hf_dir("GPT2LMHeadModel"), dst), r"not empty; pass --overwrite")
    assert (dst / "mine.txt").read_text() == "keep me"
    # A failing --overwrite conversion leaves the old destination untouched.
    bad = tmp_path / "bad"
    shutil.copytree(hf_dir("GPT2LMHeadModel"), bad)
    (bad / "model.safetensors").unlink()
    assert_one_line_error(cli("convert", bad, dst, "--overwrite"), r"holds no weights")
    assert (dst / "mine.txt").read_text() == "keep me"
    proc = cli("convert", hf_dir("GPT2LMHeadModel"), dst, "--overwrite")
    assert proc.returncode == 0 and not (dst / "mine.txt").exists() and (dst / "params").is_dir()


@pytest.mark.slow
def test_convert_124m_peak_memory_under_twice_file_size(hf_dir, tmp_path):
    src = hf_dir("GPT2LMHeadModel", "base")
    size = (src / "model.safetensors").stat().st_size
    # A fresh wrapper process whose only child is the conversion, so RUSAGE_CHILDREN is its peak.
    code = ("import resource, subprocess, sys; "
            f"r = subprocess.run([sys.executable, '-m', 'jaxlm.cli', 'convert', {str(src)!r}, {str(tmp_path / 'out')!r}]); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024); sys.exit(r.returncode)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    peak = int(proc.stdout.split()[-1])
    print(f"convert 124M: peak RSS {peak / 2**20:.0f} MiB = {peak / size:.2f}x the {size / 2**20:.0f} MiB file")
    assert peak <= 2 * size


def test_generate_json_and_streaming(hf_dir, tmp_path, cli):
    import jaxlm

    src = hf_dir("GPT2LMHeadModel")
    proc = cli("generate", src, "--prompt", "Hello", "--prompt", "The cat sat", "--max-new-tokens", 8, "--json")
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    want = jaxlm.load(src).generate(["Hello", "The cat sat"], max_new_tokens=8)
    assert [d["prompt"] for d in lines] == ["Hello", "The cat sat"]
    assert [d["text"] for d in lines] == want
    assert all(len(d["token_ids"]) == 8 for d in lines)
    proc = cli("generate", src, "--prompt", "Hello", "--max-new-tokens", 8)
    assert proc.returncode == 0 and proc.stdout == "Hello" + want[0] + "\n"


@pytest.mark.parametrize("flags, message", [
    (["--top-p", "2"], r"top_p=2.0 must be in \(0, 1\]"),
    (["--temperature", "-1"], "temperature=-1.0 must be >= 0"),
    (["--top-k", "60000"], r"top_k=60000 must be in \[0, 50257\]"),
    (["--num-return-sequences", "0"], "num_return_sequences=0 must be >= 1"),
    (["--max-new-tokens", "500"], "exceeds the model's context of 128 tokens"),
    (["train.steps=3"], r"jaxlm generate takes only mesh.\* settings \(e.g. mesh.tensor=2\); got 'train.steps=3'"),
    (["mesh.tensor=16"], "does not fit 8 devices"),
])
def test_generate_bad_input_exits_2(cli, hf_dir, flags, message):
    proc = cli("generate", hf_dir("GPT2LMHeadModel"), "--prompt", "Hi", *flags)
    assert_one_line_error(proc, message)
    assert proc.stdout == ""
