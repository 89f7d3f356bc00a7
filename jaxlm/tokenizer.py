"""Tokenizers: byte-level (no files) and Hugging Face ``tokenizers`` BPE / WordPiece from a model dir.

Both implement ``Tokenizer``: ``encode``, ``encode_batch``, ``decode``, ``vocab_size``, every
special id (None where the tokenizer has no such token), ``special_ids``, the special tokens'
texts (``special_tokens``), the ``chat_template`` (or None), ``fingerprint`` and ``save(dir)``. Code above this module uses only that surface.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Protocol

from tokenizers import Tokenizer as _Backend
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors

# Files that make up a tokenizer in a Hugging Face (or jaxlm) model directory.
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "vocab.txt",
                   "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


class Tokenizer(Protocol):
    vocab_size: int
    chat_template: str | None  # a Jinja chat template (jaxlm.chat), or None
    special_tokens: dict[str, str]  # e.g. {"eos_token": "</s>", ...}: what chat templates name
    bos_id: int | None
    eos_id: int | None  # ends every document in packed training data; generation stops at it
    pad_id: int | None
    mask_id: int | None  # MLM's [MASK]
    cls_id: int | None
    sep_id: int | None
    unk_id: int | None

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...

    def encode_batch(self, texts: list[str], add_special_tokens: bool = False) -> list[list[int]]: ...

    def decode(self, ids) -> str: ...

    @property
    def special_ids(self) -> tuple[int, ...]: ...

    @property
    def fingerprint(self) -> str: ...

    def save(self, directory) -> None: ...


class _SpecialIds:
    bos_id = eos_id = pad_id = mask_id = cls_id = sep_id = unk_id = None

    @property
    def special_ids(self) -> tuple[int, ...]:
        """Ids that mark structure rather than text (BOS, EOS, padding, [CLS], [SEP]): never
        chosen for MLM masking."""
        ids = (self.bos_id, self.eos_id, self.pad_id, self.cls_id, self.sep_id)
        return tuple(dict.fromkeys(i for i in ids if i is not None))


def not_unicode(e: UnicodeEncodeError) -> ValueError:
    return ValueError(f"the text is not valid Unicode: position {e.start} holds {e.object[e.start]!r} "
                      "(a lone surrogate; decode bytes with errors='replace' or 'surrogatepass' first)")


def check_unicode(texts) -> None:
    """A ValueError naming the first character of ``texts`` that UTF-8 cannot encode."""
    for t in texts:
        try:
            t.encode("utf-8")
        except UnicodeEncodeError as e:
            raise not_unicode(e) from None
        except AttributeError:
            raise ValueError(f"text to encode must be a string, not {type(t).__name__}") from None


class ByteTokenizer(_SpecialIds):
    """UTF-8 bytes as ids 0..255, then <eos>=256, <pad>=257 and <mask>=258. Needs no files."""

    vocab_size = 259
    eos_id = 256
    pad_id = 257
    mask_id = 258
    fingerprint = "byte"
    chat_template = None
    special_tokens = {"eos_token": "<eos>", "pad_token": "<pad>", "mask_token": "<mask>"}

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        try:
            ids = list(text.encode("utf-8"))
        except UnicodeEncodeError as e:
            raise not_unicode(e) from None
        return ids + [self.eos_id] if add_special_tokens else ids

    def encode_batch(self, texts, add_special_tokens: bool = False) -> list[list[int]]:
        return [self.encode(t, add_special_tokens) for t in texts]

    def __init__(self, chat_template: str | None = None):
        self.chat_template = chat_template

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def save(self, directory) -> None:
        Path(directory, "tokenizer_config.json").write_text(
            json.dumps({"tokenizer_class": "jaxlm.ByteTokenizer"}) + "\n")
        if self.chat_template is not None:
            Path(directory, "chat_template.jinja").write_text(self.chat_template, encoding="utf-8")

    def __repr__(self):
        return "ByteTokenizer()"


class HFTokenizer(_SpecialIds):
    """A ``tokenizers.Tokenizer`` (BPE or WordPiece) with the special ids a model needs."""

    def __init__(self, tok, files: dict[str, bytes], special: dict[str, str]):
        self.backend = tok  # the tokenizers.Tokenizer
        self._files = files  # original files, written back verbatim by save()
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self._special = dict(special)
        ids = {k: (tok.token_to_id(v) if v else None) for k, v in special.items()}
        for name in ("bos", "eos", "pad", "mask", "cls", "sep", "unk"):
            setattr(self, f"{name}_id", ids.get(f"{name}_token"))

    @property
    def fingerprint(self) -> str:
        """'hf' and a digest of the tokenizer files (names the token caches built with it)."""
        h = hashlib.sha1()
        for name in sorted(self._files):
            h.update(name.encode() + self._files[name])
        return "hf" + h.hexdigest()[:12]

    @property
    def chat_template(self) -> str | None:
        """The Jinja chat template saved with the tokenizer (``chat_template.jinja``, or
        ``tokenizer_config.json``'s ``chat_template``: a string, or a list of named templates of
        which "default" is used), or None."""
        if "chat_template.jinja" in self._files:
            return self._files["chat_template.jinja"].decode("utf-8")
        t = json.loads(self._files.get("tokenizer_config.json", b"{}")).get("chat_template")
        if isinstance(t, list):
            t = next((x.get("template") for x in t if x.get("name") == "default"), None)
        return t if isinstance(t, str) and t else None

    @property
    def special_tokens(self) -> dict[str, str]:
        """{"bos_token": "<s>", "eos_token": ...}: the special tokens' strings (a chat template's
        variables)."""
        return {k: v for k, v in self._special.items() if v}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids, with the model's special tokens (e.g. BERT's [CLS] ... [SEP]) by default."""
        try:
            return self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        except TypeError:  # tokenizers: "TextInputSequence must be str" for text with lone surrogates
            check_unicode([text])
            raise

    def encode_batch(self, texts, add_special_tokens: bool = False) -> list[list[int]]:
        """Ids of many texts, encoded in parallel by ``tokenizers``; no special tokens by default
        (documents inside packed training data)."""
        texts = list(texts)
        try:
            return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=add_special_tokens)]
        except TypeError:
            check_unicode(texts)
            raise

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def save(self, directory) -> None:
        for name, data in self._files.items():
            Path(directory, name).write_bytes(data)

    def __repr__(self):
        return f"HFTokenizer(vocab_size={self.vocab_size}, files={sorted(self._files)})"


def _token_str(value) -> str | None:
    # special_tokens_map / tokenizer_config hold either "tok" or {"content": "tok", ...}.
    return value.get("content") if isinstance(value, dict) else value


def load_tokenizer(directory) -> Tokenizer | None:
    """The tokenizer stored in a model directory (or a ``tokenizer.json`` file, with the
    ``tokenizer_config.json`` beside it if any), or None if it holds no tokenizer files."""
    d = Path(directory)
    if d.is_file():
        files = {"tokenizer.json": d.read_bytes()}
        if (d.parent / "tokenizer_config.json").is_file():
            files["tokenizer_config.json"] = (d.parent / "tokenizer_config.json").read_bytes()
        d = d.parent
    else:
        files = {n: (d / n).read_bytes() for n in TOKENIZER_FILES if (d / n).is_file()}
    conf = json.loads(files.get("tokenizer_config.json", b"{}"))
    if conf.get("tokenizer_class") == "jaxlm.ByteTokenizer":
        template = files.get("chat_template.jinja")
        return ByteTokenizer(None if template is None else template.decode("utf-8"))
    special = {**json.loads(files.get("special_tokens_map.json", b"{}")), **conf}
    special = {k: _token_str(v) for k, v in special.items() if k.endswith("_token")}

    if "tokenizer.json" in files:
        tok = _Backend.from_str(files["tokenizer.json"].decode("utf-8"))
        # Files saved by HF often carry fixed padding / truncation for batching; encode() must not.
        tok.no_padding()
        tok.no_truncation()
        is_wordpiece = json.loads(files["tokenizer.json"])["model"]["type"] == "WordPiece"
    elif "vocab.json" in files and "merges.txt" in files:
        # GPT-2 byte-level BPE.
        tok = _Backend(models.BPE.from_file(str(d / "vocab.json"), str(d / "merges.txt")))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        is_wordpiece = False
        special.setdefault("eos_token", "<|endoftext|>")
        if tok.token_to_id(special["eos_token"]) is not None:
            tok.add_special_tokens([special["eos_token"]])
    elif "vocab.txt" in files:
        # BERT WordPiece, as BertTokenizerFast builds it.
        tok = _Backend(models.WordPiece.from_file(str(d / "vocab.txt"), unk_token=special.get("unk_token", "[UNK]")))
        lower = conf.get("do_lower_case", True)
        tok.normalizer = normalizers.BertNormalizer(
            clean_text=True, handle_chinese_chars=conf.get("tokenize_chinese_chars", True),
            strip_accents=conf.get("strip_accents"), lowercase=lower)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece(prefix="##")
        is_wordpiece = True
    else:
        return None

    if is_wordpiece:
        for k, v in (("cls_token", "[CLS]"), ("sep_token", "[SEP]"), ("pad_token", "[PAD]"),
                     ("unk_token", "[UNK]"), ("mask_token", "[MASK]")):
            special.setdefault(k, v)
        present = [special[k] for k in ("cls_token", "sep_token", "pad_token", "unk_token", "mask_token")
                   if tok.token_to_id(special[k]) is not None]
        tok.add_special_tokens(present)
        if "tokenizer.json" not in files:
            cls, sep = special["cls_token"], special["sep_token"]
            tok.post_processor = processors.TemplateProcessing(
                single=f"{cls} $A {sep}", pair=f"{cls} $A {sep} $B:1 {sep}:1",
                special_tokens=[(cls, tok.token_to_id(cls)), (sep, tok.token_to_id(sep))])
        special.setdefault("eos_token", special["sep_token"])
    return HFTokenizer(tok, files, special)


def with_chat_template(tok: Tokenizer, template: str) -> Tokenizer:
    """``tok`` carrying ``template`` as its chat template (saved as ``chat_template.jinja``), e.g.
    the one a model was fine-tuned with, so that ``jaxlm serve`` renders chats the same way."""
    if isinstance(tok, ByteTokenizer):
        return ByteTokenizer(template)
    return HFTokenizer(tok.backend, {**tok._files, "chat_template.jinja": template.encode("utf-8")}, tok._special)


def copy_tokenizer_files(src, dst) -> list[str]:
    """Copy the tokenizer files of model dir ``src`` into ``dst``; returns the names copied."""
    copied = []
    for name in TOKENIZER_FILES:
        if Path(src, name).is_file():
            shutil.copyfile(Path(src, name), Path(dst, name))
            copied.append(name)
    return copied


TOKENIZER_TYPES = ("bpe", "wordpiece", "unigram")


def train_tokenizer(texts, vocab_size: int, kind: str = "bpe", *, min_frequency: int = 2,
                    length: int | None = None) -> HFTokenizer:
    """A new tokenizer trained on ``texts`` (an iterable of strings) by ``tokenizers``' trainers.

    bpe: GPT-2's byte-level BPE (every text round-trips: the 256 bytes are in the vocabulary) with
    ``<|endoftext|>`` as EOS and padding; wordpiece: BERT's (lower-cased, [CLS] ... [SEP], [MASK]);
    unigram: SentencePiece's model over Metaspace pieces (``<unk>`` for unseen characters).
    """
    from tokenizers import trainers

    if kind not in TOKENIZER_TYPES:
        raise ValueError(f"--type={kind} is not one of {', '.join(TOKENIZER_TYPES)}")
    if kind == "bpe":
        special = {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "bos_token": "<|endoftext|>"}
        tok = _Backend(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
        floor = len(alphabet) + 1
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
                                      special_tokens=["<|endoftext|>"], initial_alphabet=alphabet)
    elif kind == "wordpiece":
        special = {"cls_token": "[CLS]", "sep_token": "[SEP]", "pad_token": "[PAD]", "unk_token": "[UNK]",
                   "mask_token": "[MASK]", "eos_token": "[SEP]"}
        tok = _Backend(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece(prefix="##")
        floor = 6
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
                                            special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    else:
        special = {"unk_token": "<unk>", "eos_token": "</s>", "pad_token": "<pad>", "bos_token": "<s>"}
        tok = _Backend(models.Unigram())
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        floor = 5
        trainer = trainers.UnigramTrainer(vocab_size=vocab_size, show_progress=False, unk_token="<unk>",
                                          special_tokens=["<pad>", "<unk>", "<s>", "</s>"])
    if vocab_size < floor:
        raise ValueError(f"--vocab-size={vocab_size} is too small for a {kind} tokenizer: at least {floor}")
    texts = iter(texts)
    tok.train_from_iterator(texts, trainer, length=length)
    if tok.get_vocab_size() == 0:
        raise ValueError("the data holds no text to train a tokenizer on")
    if kind == "wordpiece":
        cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 1 << 30, **special}
    files = {"tokenizer.json": tok.to_str().encode("utf-8"),
             "tokenizer_config.json": (json.dumps(config, indent=2) + "\n").encode("utf-8")}
    return HFTokenizer(tok, files, special)
