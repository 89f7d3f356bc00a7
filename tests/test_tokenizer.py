"""Tokenizers: ids equal to Hugging Face's on varied text; decode(encode(s)) == s where lossless."""

import shutil

import pytest
from transformers import AutoTokenizer, GPT2Config

from jaxlm.testing import gpt2_tokenizer_files, minilm_dir
from jaxlm.tokenizer import ByteTokenizer, load_tokenizer

TEXTS = [
    "Hello world, it's a test of the tokenizer.",  # ASCII
    "Café naïve résumé — ÉCOLE façade",  # accented
    "日本語のテキストと中文字符",  # CJK
    "emoji 🤖🎉 and 👩‍👩‍👧 families",  # emoji, ZWJ sequences
    "  leading spaces\n\ttabs and\r\nnewlines  ",
    "def f(x):\n    return x ** 2  # code",
]


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("gpt2tok")
    for name, src in gpt2_tokenizer_files().items():
        shutil.copyfile(src, d / name)
    GPT2Config().save_pretrained(d)  # tells AutoTokenizer which (reference) tokenizer class to build
    return d


@pytest.mark.parametrize("text", TEXTS)
def test_gpt2_bpe_matches_hf_and_round_trips(gpt2_dir, text):
    ours, ref = load_tokenizer(gpt2_dir), AutoTokenizer.from_pretrained(str(gpt2_dir))
    ids = ours.encode(text)
    assert ids == ref(text)["input_ids"]
    assert ours.decode(ids) == text


def test_gpt2_specials_and_tokenizer_json(gpt2_dir, tmp_path):
    tok = load_tokenizer(gpt2_dir)
    assert tok.vocab_size == 50257 and tok.eos_id == 50256
    assert tok.encode("a<|endoftext|>b") == [64, 50256, 65]
    tok.backend.save(str(tmp_path / "tokenizer.json"))  # the same tokenizer as one tokenizer.json
    again = load_tokenizer(tmp_path)
    assert [again.encode(t) for t in TEXTS] == [tok.encode(t) for t in TEXTS]


@pytest.mark.parametrize("files", [("tokenizer.json", "tokenizer_config.json"),
                                   ("vocab.txt", "tokenizer_config.json", "special_tokens_map.json")])
def test_bert_wordpiece_matches_hf(files, tmp_path):
    for name in files:
        shutil.copyfile(minilm_dir() / name, tmp_path / name)
    ours, ref = load_tokenizer(tmp_path), AutoTokenizer.from_pretrained(str(minilm_dir()))
    for text in TEXTS + ["x" * 300]:  # long input: no truncation or padding from tokenizer.json
        ids = ours.encode(text)
        assert ids == ref(text)["input_ids"]
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True)
    assert ours.pad_id == 0 and ours.encode("")[0] == ref.cls_token_id


@pytest.mark.parametrize("text", TEXTS)
def test_byte_tokenizer_round_trips(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8")) and tok.decode(ids) == text
    assert tok.decode(ids + [tok.eos_id, tok.pad_id]) == text


def test_byte_tokenizer_saved_and_loaded(tmp_path):
    ByteTokenizer().save(tmp_path)
    assert isinstance(load_tokenizer(tmp_path), ByteTokenizer)


def test_no_tokenizer_files_gives_none(tmp_path):
    assert load_tokenizer(tmp_path) is None


# Training a tokenizer (`jaxlm tokenizer train`) ------------------------------------------------

@pytest.fixture(scope="module")
def stdlib_files():
    from jaxlm.data import stdlib_dir

    return sorted(stdlib_dir().glob("*.py"))[:80]


def test_trained_bpe_round_trips_every_file_and_transformers_reads_it(stdlib_files, tmp_path, capsys):
    from jaxlm.cli import main

    assert main(["tokenizer", "train", *map(str, stdlib_files[:60]), "--vocab-size", "1000",
                 "--out", str(tmp_path / "tok")]) == 0
    assert "trained a bpe tokenizer of 1000 tokens on 60 files" in capsys.readouterr().err
    tok = load_tokenizer(tmp_path / "tok")
    assert tok.vocab_size == 1000 and tok.decode([tok.eos_id], skip_special_tokens=False) == "<|endoftext|>"
    for f in stdlib_files:  # the 20 files not trained on too
        text = f.read_text()
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids, skip_special_tokens=False) == text, f
    assert len(tok.encode(stdlib_files[0].read_text())) < 0.5 * len(stdlib_files[0].read_bytes())  # it compresses
    hf = AutoTokenizer.from_pretrained(tmp_path / "tok")  # the same files, read by transformers
    text = stdlib_files[70].read_text()
    assert hf(text)["input_ids"] == tok.encode(text) and hf.eos_token == "<|endoftext|>"
    alone = load_tokenizer(tmp_path / "tok" / "tokenizer.json")  # data.tokenizer=.../tokenizer.json
    assert alone.encode(text) == tok.encode(text) and alone.eos_id == tok.eos_id


@pytest.mark.parametrize("kind", ["wordpiece", "unigram"])
def test_trained_wordpiece_and_unigram_tokenizers(stdlib_files, tmp_path, kind):
    from jaxlm.tokenizer import train_tokenizer

    tok = train_tokenizer((f.read_text() for f in stdlib_files[:10]), 600, kind)
    tok.save(tmp_path)
    again = load_tokenizer(tmp_path)
    text = "def parse(self, value):\n    return value"
    assert again.encode(text) == tok.encode(text) and tok.vocab_size <= 600
    decoded = tok.decode(tok.encode(text))
    if kind == "unigram":
        assert decoded.split() == text.split()
    else:  # lower-cased, and spaces around punctuation are not kept (BERT's pre-tokenizer)
        assert "".join(decoded.split()) == "".join(text.lower().split())
    if kind == "wordpiece":  # BERT's layout: [CLS] ... [SEP], and a [MASK] for MLM
        ids = tok.encode(text)
        assert ids[0] == tok.cls_id and ids[-1] == tok.sep_id and tok.mask_id is not None


def test_tokenizer_train_bad_input_is_one_line(cli, stdlib_files, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("")
    (tmp_path / "mixed").mkdir()
    (tmp_path / "mixed" / "blob.bin").write_bytes(bytes(range(256)) * 4)  # not UTF-8
    (tmp_path / "mixed" / "nul.txt").write_bytes(b"text\0with a NUL")  # UTF-8, but binary
    shutil.copy(stdlib_files[0], tmp_path / "mixed" / "a.py")
    out = str(tmp_path / "out")
    for argv, message in [
        ([str(tmp_path / "empty"), "--vocab-size", "300"], "the 1 files hold no text to train a tokenizer on"),
        ([str(tmp_path / "nowhere"), "--vocab-size", "300"], f"data path {tmp_path / 'nowhere'} does not exist"),
        ([str(tmp_path / "mixed"), "--vocab-size", "100"], "--vocab-size=100 is too small for a bpe tokenizer: at least 257"),
        ([str(tmp_path / "mixed"), "--vocab-size", "300", "--type", "sentencepiece"], "argument --type: invalid choice"),
    ]:
        proc = cli("tokenizer", "train", *argv, "--out", out)
        err = proc.stderr.strip().splitlines()  # progress lines, then the error in one line
        assert proc.returncode == 2 and message in err[-1] and err[-1].startswith("jaxlm tokenizer train: error: "), err
        assert sum("error" in line for line in err) == 1 and "Traceback" not in "".join(err)
        assert not (tmp_path / "out").exists()
    # Binary and non-UTF-8 files are skipped, named and counted; the text ones are trained on.
    proc = cli("tokenizer", "train", tmp_path / "mixed", "--vocab-size", 300, "--out", out)
    err = proc.stderr
    assert proc.returncode == 0, err
    assert f"skipped {tmp_path / 'mixed' / 'blob.bin'}: binary or not UTF-8 text" in err
    assert "on 1 files" in err and "skipped 2 binary or non-UTF-8 files" in err
