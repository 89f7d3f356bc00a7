"""Checksums (io/checksums.py): every jaxlm model dir is sealed when written; a damaged file is
named in one line by every reader (load, generate, export), never loaded as wrong numbers."""

import shutil

import numpy as np
import pytest

import jaxlm
from jaxlm import cli
from jaxlm.io import checksums


@pytest.fixture(scope="module")
def model_dir(hf_dir, tmp_path_factory):
    dst = tmp_path_factory.mktemp("sealed") / "model"
    assert cli.main(["convert", str(hf_dir("GPT2LMHeadModel")), str(dst)]) == 0
    return dst


def largest_array_file(d):
    return max((p for p in (d / "params").rglob("*") if p.is_file() and p.parent.name == "d"),
               key=lambda p: p.stat().st_size)


@pytest.mark.parametrize("damage, reason", [
    ("flip", r"its SHA-256 differs"),
    ("truncate", r"\d+ bytes, \d+ when written"),
    ("delete", r"missing"),
])
def test_damaged_model_dir_is_named_by_every_reader(model_dir, tmp_path, capsys, damage, reason):
    d = tmp_path / "m"
    shutil.copytree(model_dir, d)
    f = largest_array_file(d)
    data = f.read_bytes()
    if damage == "flip":
        f.write_bytes(data[:len(data) // 2] + bytes([data[len(data) // 2] ^ 1]) + data[len(data) // 2 + 1:])
    elif damage == "truncate":
        f.write_bytes(data[:-100])
    else:
        f.unlink()
    line = rf"{f} is damaged \({reason}\): it does not match {d}/checksums.json, written with it"
    with pytest.raises(checksums.DamagedError, match=f"^{line}$"):
        jaxlm.load(d)
    for argv in (["generate", str(d), "--prompt", "a"], ["export", str(d), str(tmp_path / "hf")],
                 ["quantize", str(d), str(tmp_path / "q")]):
        capsys.readouterr()
        assert cli.main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and __import__("re").fullmatch(rf"jaxlm {argv[0]}: error: {line}", err[0]), err
    assert not (tmp_path / "hf").exists() and not (tmp_path / "q").exists()


def test_sealed_dir_loads_and_unsealed_or_extended_dirs_still_load(model_dir, tmp_path):
    """Files added after the write (a README) are not checked; a dir from before checksums loads."""
    assert checksums.verify(model_dir) is True
    want = np.asarray(jaxlm.load(model_dir).logits(np.array([[1, 2, 3]])))
    d = tmp_path / "m"
    shutil.copytree(model_dir, d)
    (d / "README.md").write_text("notes")
    assert checksums.verify(d) is True
    (d / "checksums.json").unlink()
    assert checksums.verify(d) is False
    np.testing.assert_array_equal(np.asarray(jaxlm.load(d).logits(np.array([[1, 2, 3]]))), want)
    (d / "checksums.json").write_text("{not json")
    with pytest.raises(checksums.DamagedError, match=r"checksums.json is damaged \(unreadable"):
        jaxlm.load(d)
