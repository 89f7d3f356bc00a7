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
