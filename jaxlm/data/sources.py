"""Where documents come from: local files (plain text, JSONL, Parquet; gzip / zstd compressed),
tensorflow-datasets catalog datasets, the default corpus; and how the work of reading them is cut
into units.

A ``Source`` names one corpus. ``plan(source)`` cuts it into units of about ``chunk_bytes`` of input
(whole files grouped, uncompressed JSONL split at line boundaries, tfds splits by example ranges);
``documents(source, unit)`` yields ``(split, text)`` for the documents of one unit, where split is
"train" or "validation". Units depend only on the input, so any process can prepare any unit and
get the same tokens.

Train / validation: plain-text files go to validation by a hash of their path (at least one file
when there are several); a JSONL or Parquet document by a hash of ``path:position`` (its byte offset
or row number); tfds datasets keep their own splits ("validation", else "test").
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import gzip
import hashlib
import io
import json
import os
import sys
import sysconfig
import time
import zlib
from pathlib import Path

CHUNK_BYTES = 64 << 20  # input bytes per unit of work (and per token shard)
TFDS_CHUNK = 20_000  # tfds examples per unit


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def default_corpus_files() -> list[Path]:
    root = stdlib_dir()
    return sorted(f for f in root.rglob("*.py") if "site-packages" not in f.parts and f.is_file())


def resolve_paths(spec: str) -> list[Path]:
    """Files named by a comma-separated list of files, directories (recursive) and globs."""
    files = []
    for part in [p.strip() for p in str(spec).split(",") if p.strip()]:
        p = Path(part).expanduser()
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
        elif any(c in part for c in "*?["):
            found = sorted(Path(f) for f in glob.glob(str(p), recursive=True) if Path(f).is_file())
        elif p.is_file():
            found = [p]
        else:
            raise FileNotFoundError(f"data path {part} does not exist")
        if not found:
            raise ValueError(f"data path {part} holds no files")
        files += found
    return files


def in_validation(key: str, fraction: float) -> bool:
    """The one train / validation split: a document (or file, or example) goes to validation when a
    hash of its key falls in the first ``fraction`` of the range. Deterministic, and stable as
    other documents come and go."""
    return zlib.crc32(key.encode()) % 10_000 < fraction * 10_000


def _binary(data: bytes) -> bool:
    if b"\0" in data:
        return True
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


def file_texts(files, log=None, every: int = 1000):
    """(texts, stats): an iterator over the UTF-8 text of each file, and a dict it fills as it goes
    ("bytes" read as text, "skipped": files skipped as binary or not UTF-8, each named in the log)."""
    stats = {"bytes": 0, "skipped": []}
    t0 = time.perf_counter()

    def texts():
        for i, f in enumerate(files, 1):
            data = Path(f).read_bytes()
            if _binary(data):
                stats["skipped"].append(f)
                if log is not None:
                    log(f"skipped {f}: binary or not UTF-8 text")
                continue
            stats["bytes"] += len(data)
            if log is not None and i % every == 0:
                progress(i)
            yield data.decode("utf-8")
        if log is not None:
            progress(len(files))

    def progress(i):
        mb, dt = stats["bytes"] / 1e6, time.perf_counter() - t0
        log(f"read {i}/{len(files)} files, {mb:.1f} MB ({mb / max(dt, 1e-9):.1f} MB/s)")

    return texts(), stats


# ---- file formats ----------------------------------------------------------------------------

COMPRESSIONS = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd"}
RECORDS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}


def file_format(path) -> tuple[str, str | None]:
    """(format, compression) from the file name: format is text, jsonl or parquet."""
    suffixes = [s.lower() for s in Path(path).suffixes]
    compression = COMPRESSIONS.get(suffixes[-1]) if suffixes else None
    if compression:
        suffixes = suffixes[:-1]
    return (RECORDS.get(suffixes[-1], "text") if suffixes else "text"), compression


def open_binary(path, compression):
    """The file's bytes, decompressed as they are read."""
    if compression == "gzip":
        return gzip.open(path, "rb")
    if compression == "zstd":
        import zstandard  # the `data` extra

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True))
    return open(path, "rb")


# ---- sources and units -------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Source:
    """One corpus: local files, or a tfds catalog dataset (``tfds_name``)."""

    files: tuple[str, ...] = ()
    tfds_name: str | None = None
    unit: str = "file"  # plain text: one document per file or per line
    text_key: str = "text"  # JSONL field / Parquet column / tfds feature holding the text
    val_fraction: float = 0.05
    data_dir: str | None = None  # where tfds datasets are prepared
    label: str = ""  # how the user named it (messages)

    @functools.cached_property
    def root(self) -> str:
        return os.path.commonpath([str(Path(f).parent) for f in self.files]) if self.files else "."

    def digest(self) -> str:
        """Names the prepared tokens: the files (path, size, mtime) or the tfds name, and the settings."""
        h = hashlib.sha1(f"v2:{self.unit}:{self.text_key}:{self.val_fraction}:{self.tfds_name}".encode())
        for f in self.files:
            st = os.stat(f)
            h.update(f"{f}:{st.st_size}:{int(st.st_mtime)}".encode())
        return h.hexdigest()[:12]


def files_source(spec: str, **kwargs) -> Source:
    return Source(files=tuple(str(f) for f in resolve_paths(spec)), label=str(spec), **kwargs)


def tfds_source(name: str, data_dir=None, **kwargs) -> Source:
    return Source(tfds_name=name, data_dir=str(data_dir) if data_dir else None, label=f"tfds:{name}", **kwargs)


@functools.lru_cache(maxsize=16)
def _tfds_splits(source: Source) -> dict[str, str]:
    """{"train": tfds split, "validation": tfds split} of a prepared catalog dataset."""
    import tensorflow_datasets as tfds  # lazy: ~0.5 s

    try:
        builder = tfds.builder(source.tfds_name, data_dir=source.data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise ValueError(f"data.tfds_name={source.tfds_name!r} is not a tensorflow-datasets catalog dataset "
                         "(see tfds.list_builders())") from None
    if not builder.is_prepared():
        raise ValueError(f"tfds dataset {source.tfds_name!r} is not prepared in {builder.data_dir}: prepare it "
                         f"first (tfds build {source.tfds_name} --data_dir=...) and set data.data_dir")
    names = list(builder.info.splits.keys())
    val = next((s for s in ("validation", "test") if s in names), None)
    if "train" not in names or val is None:
        raise ValueError(f"tfds dataset {source.tfds_name!r} has splits {names}: need train and validation or test")
    return {"train": "train", "validation": val}


@functools.lru_cache(maxsize=16)
def _tfds_data_source(source: Source, split: str):
    import tensorflow_datasets as tfds

    return tfds.data_source(source.tfds_name, split=split, data_dir=source.data_dir, download=False)


def plan(source: Source, chunk_bytes: int = CHUNK_BYTES) -> list[tuple]:
    """The units of work: a tuple of pieces each. A piece is ("file", path, start, end) (bytes
    [start, end) of the file, lines belong to the piece they start in; end None: to the end) or
    ("tfds", split, start, end) (examples)."""
    if source.tfds_name:
        units = []
        for ours, theirs in _tfds_splits(source).items():
            n = len(_tfds_data_source(source, theirs))
            units += [(("tfds", ours, a, min(n, a + TFDS_CHUNK)),) for a in range(0, n, TFDS_CHUNK)]
        return units
    pieces = []
    for f in source.files:
        size = os.path.getsize(f)
        fmt, compression = file_format(f)
        if fmt == "jsonl" and compression is None and size > chunk_bytes:
            pieces += [(("file", f, a, min(size, a + chunk_bytes)), chunk_bytes) for a in range(0, size, chunk_bytes)]
        else:
            pieces.append((("file", f, 0, None), size))
    units, current, held = [], [], 0
    for piece, size in pieces:  # consecutive pieces grouped up to chunk_bytes
        if current and held + size > chunk_bytes:
            units.append(tuple(current))
            current, held = [], 0
        current.append(piece)
        held += size
    if current:
        units.append(tuple(current))
    return units


def validation_files(source: Source) -> frozenset[str]:
    """Plain-text files of the validation split (by a hash of the path relative to the root); when
    the hash picks none of several files and there are no record files, the last one."""
    text = [f for f in source.files if file_format(f)[0] == "text"]
    val = [f for f in text if in_validation(os.path.relpath(f, source.root), source.val_fraction)]
    records = len(text) < len(source.files)
    if not val and len(text) > 1 and not records:
        val = text[-1:]
    return frozenset(val)


class Skipped(Exception):
    """A file that is not text (binary, or not UTF-8): skipped and counted."""


def documents(source: Source, unit, stats: dict, val_files=None):
    """(split, text) for each document of the unit; fills stats["bytes"] (of text read) and
    stats["skipped"] (files skipped as binary or not UTF-8)."""
    val_files = validation_files(source) if val_files is None else val_files
    for piece in unit:
        if piece[0] == "tfds":
            yield from _tfds_documents(source, piece, stats)
            continue
        _, f, start, end = piece
        fmt, compression = file_format(f)
        rel = os.path.relpath(f, source.root)
        if fmt == "text":
            try:
                yield from _text_documents(source, f, compression, "validation" if f in val_files else "train", stats)
            except Skipped:
                stats["skipped"].append(f)
        elif fmt == "jsonl":
            yield from _jsonl_documents(source, f, compression, start, end, rel, stats)
        else:
            yield from _parquet_documents(source, f, rel, stats)


def _text_documents(source, f, compression, split, stats):
    with open_binary(f, compression) as fh:
        data = fh.read()
    if _binary(data):
        raise Skipped(f)
    stats["bytes"] += len(data)
    text = data.decode("utf-8")
    if source.unit == "file":
        if text.strip():
            yield split, text
    else:
        for line in text.splitlines():
            if line.strip():
                yield split, line


def _line_number(f, compression, offset) -> int:
    with open_binary(f, compression) as fh:
        return fh.read(offset).count(b"\n") + 1


def _jsonl_documents(source, f, compression, start, end, rel, stats):
    key = source.text_key
    with open_binary(f, compression) as fh:
        pos = 0
        if start:  # the line that starts before `start` belongs to the previous piece
            fh.seek(start - 1)
            pos = start - 1 + len(fh.readline())
        for line in iter(fh.readline, b""):
            if end is not None and pos >= end:
                break
            at, pos = pos, pos + len(line)
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as e:
                raise ValueError(f"{f}:{_line_number(f, compression, at)} is not a JSON object ({e})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{f}:{_line_number(f, compression, at)} is not a JSON object")
            text = record.get(key)
            if not isinstance(text, str):
                what = (f"no {key!r} field (fields: {', '.join(record) or 'none'})" if key not in record
                        else f"a {key!r} field that is not text")
                raise ValueError(f"{f}:{_line_number(f, compression, at)} has {what}; set data.text_key")
            stats["bytes"] += len(line)
            if text.strip():
                yield ("validation" if in_validation(f"{rel}:{at}", source.val_fraction) else "train"), text


def _parquet_documents(source, f, rel, stats):
    import pyarrow.parquet as pq  # the `data` extra

    try:
        pf = pq.ParquetFile(f)
    except Exception as e:  # pyarrow raises its own ArrowInvalid for damaged files
        raise ValueError(f"{f} is not a Parquet file ({e})") from None
    names = pf.schema_arrow.names
    if source.text_key not in names:
        raise ValueError(f"{f} has no column {source.text_key!r} (columns: {', '.join(names)}); set data.text_key")
    row = 0
    for batch in pf.iter_batches(batch_size=4096, columns=[source.text_key]):
        for text in batch.column(0).to_pylist():
            if isinstance(text, str):
                stats["bytes"] += len(text.encode("utf-8"))
                if text.strip():
                    yield ("validation" if in_validation(f"{rel}:{row}", source.val_fraction) else "train"), text
            row += 1


def _tfds_documents(source, piece, stats):
    _, split, a, b = piece
    ds = _tfds_data_source(source, _tfds_splits(source)[split])
    key = source.text_key
    for i in range(a, b):
        example = ds[i]
        if key not in example:
            raise ValueError(f"tfds dataset {source.tfds_name!r} has no feature {key!r} "
                             f"(features: {', '.join(example)}); set data.text_key")
        v = example[key]
        text = v.decode("utf-8", errors="replace") if isinstance(v, bytes) else str(v)
        stats["bytes"] += len(text.encode("utf-8"))
        if text.strip():
            yield split, text


def stdlib_tag() -> str:
    return f"py{sys.version_info.major}{sys.version_info.minor}"
