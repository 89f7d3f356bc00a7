"""Sequence classification data and metrics (``train.objective=classify``).

Examples are (text, label) pairs from a local JSONL / CSV file (or a directory holding
``train.*`` and ``validation.*``), or a tensorflow-datasets catalog dataset by name
(``data.tfds_name=glue/sst2 data.text_key=sentence``). Labels may be strings or integers; they
are numbered in sorted order and the names kept in the model config (``label_names``).
``package_task`` builds the offline demo task: which top-level standard-library package a
piece of source code comes from.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from jaxlm.data import default_corpus_files, in_validation, stdlib_dir

SUFFIXES = (".jsonl", ".json", ".csv")


def _read_file(path: Path, text_key: str, label_key: str) -> list[tuple[str, object]]:
    out = []
    if path.suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            for i, row in enumerate(reader):
                if text_key not in row or label_key not in row:
                    raise ValueError(f"{path} row {i + 1} lacks column {text_key!r} or {label_key!r} "
                                     f"(columns: {', '.join(reader.fieldnames or [])})")
                out.append((row[text_key], row[label_key]))
    else:
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
            if not line.strip():
                continue
            row = json.loads(line)
            if text_key not in row or label_key not in row:
                raise ValueError(f"{path} line {i + 1} lacks key {text_key!r} or {label_key!r}")
            out.append((row[text_key], row[label_key]))
    return out


def read_examples(data_cfg, split: str) -> list[tuple[str, object]]:
    """(text, label) pairs of a split; see the module docstring for the sources."""
    if data_cfg.tfds_name:
        import tensorflow_datasets as tfds  # lazy: ~0.3 s, only for catalog datasets

        src = tfds.data_source(data_cfg.tfds_name, split=split, data_dir=data_cfg.data_dir, download=False)
        return [(_text(src[i][data_cfg.text_key]), _label(src[i][data_cfg.label_key])) for i in range(len(src))]
    if not data_cfg.path:
        raise ValueError("train.objective=classify needs labeled data: data.path=FILE.jsonl|FILE.csv|DIR "
                         "or data.tfds_name=NAME (e.g. glue/sst2)")
    p = Path(data_cfg.path).expanduser()
    if p.is_dir():
        found = [f for f in sorted(p.iterdir()) if f.stem == split and f.suffix in SUFFIXES]
        if not found:
            raise FileNotFoundError(f"{p} holds no {split}.jsonl or {split}.csv")
        return _read_file(found[0], data_cfg.text_key, data_cfg.label_key)
    if not p.is_file():
        raise FileNotFoundError(f"data path {p} does not exist")
    if p.suffix not in SUFFIXES:
        raise ValueError(f"data.path={p}: labeled data must be .jsonl or .csv")
    rows = _read_file(p, data_cfg.text_key, data_cfg.label_key)
    # One file: the split by a hash of the text.
    return [r for r in rows if in_validation(r[0], data_cfg.val_fraction) == (split == "validation")]


def _text(v) -> str:
    return v.decode("utf-8", errors="replace") if isinstance(v, bytes) else str(v)


def _label(v):
    return v.decode() if isinstance(v, bytes) else (int(v) if np.ndim(v) == 0 and np.issubdtype(np.asarray(v).dtype, np.integer) else v)


def label_names(examples) -> tuple[str, ...]:
    labels = {str(lab) for _, lab in examples}
    if len(labels) < 2:
        raise ValueError(f"classification needs at least 2 labels; the training data has {sorted(labels)}")
    return tuple(sorted(labels, key=lambda s: (not s.lstrip("-").isdigit(), int(s) if s.lstrip("-").isdigit() else 0, s)))


class ClassRows:
    """Example i -> {"ids": [T], "mask": [T], "label": int}: tokens truncated / padded to seq_len,
    starting with the tokenizer's [CLS] (or its EOS as a start token for the byte tokenizer)."""

    def __init__(self, examples, tokenizer, names, seq_len: int):
        index = {n: i for i, n in enumerate(names)}
        self.seq_len = seq_len
        n = len(examples)
        self.ids = np.full((n, seq_len), tokenizer.pad_id if tokenizer.pad_id is not None else 0, np.int32)
        self.mask = np.zeros((n, seq_len), bool)
        self.labels = np.zeros(n, np.int32)
        cls = tokenizer.cls_id
        for i, (text, label) in enumerate(examples):
            if str(label) not in index:
                raise ValueError(f"label {label!r} is not among the training labels ({', '.join(names)})")
            ids = tokenizer.encode(text, add_special_tokens=True) if cls is not None else \
                [tokenizer.eos_id] + tokenizer.encode(text)
            ids = ids[:seq_len]
            self.ids[i, :len(ids)], self.mask[i, :len(ids)] = ids, True
            self.labels[i] = index[str(label)]

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        i = int(i)
        return {"ids": self.ids[i], "mask": self.mask[i], "label": self.labels[i]}


def macro_f1(confusion) -> float:
    """Mean over classes of F1 from a confusion matrix [true, predicted] (absent classes skipped)."""
    c = np.asarray(confusion, np.float64)
    tp = np.diag(c)
    support, predicted = c.sum(1), c.sum(0)
    f1 = np.where(support + predicted > 0, 2 * tp / np.maximum(support + predicted, 1e-12), 0.0)
    present = support > 0
    return float(f1[present].mean()) if present.any() else 0.0


def package_task(out_dir, *, packages=("asyncio", "ctypes", "distutils", "email", "encodings", "idlelib",
                                       "lib2to3", "tkinter", "unittest"),
                 chunk_chars: int = 384, chunks_per_file: int = 6, val_fraction: float = 0.2) -> dict:
    """Write OUT/train.jsonl and OUT/validation.jsonl: pieces of the standard library's source
    labeled with their top-level package, split by file (validation files are unseen).
    Returns {"train": n, "validation": n, "labels": [...]}."""
    root = stdlib_dir()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = {"train": [], "validation": []}
    for f in default_corpus_files():
        rel = f.relative_to(root)
        if len(rel.parts) < 2 or rel.parts[0] not in packages:
            continue
        text = f.read_text(encoding="utf-8", errors="replace")
        split = "validation" if in_validation(str(rel), val_fraction) else "train"
        for k in range(chunks_per_file):
            piece = text[k * chunk_chars:(k + 1) * chunk_chars]
            if len(piece.strip()) < chunk_chars // 4:
                break
            rows[split].append({"text": piece, "label": rel.parts[0]})
    for split, items in rows.items():
        (out / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in items))
    return {"train": len(rows["train"]), "validation": len(rows["validation"]), "labels": sorted(packages)}
