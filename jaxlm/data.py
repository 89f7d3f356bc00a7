"""Input pipeline: tensorflow-datasets text -> tokens -> packed rows -> grain loader.

- Local text (files, directories, globs; one example per file or per line) becomes a tfds dataset
  prepared as array_record and read with ``as_data_source`` (no TensorFlow needed); catalog
  datasets are read by name when they are prepared in ``data_dir``.
- The default corpus is the Python standard library's own ``.py`` files (on every machine that can
  run jaxlm), split by file into train and validation.
- Documents are tokenized once per (dataset, split, tokenizer), joined with EOS separators into
  one token stream cached as ``.npy``, and cut into rows of ``seq_len + 1`` tokens.
- A grain MapDataset over row indices shuffles with the seed, keeps this host's shard
  (``jax.process_index()``) and batches; its iterator state is saved in every checkpoint.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import glob
import hashlib
import os
import sys
import sysconfig
import time
import zlib
from pathlib import Path

import numpy as np

DEFAULT_DATA_DIR = Path(os.environ.get("JAXLM_DATA_DIR", Path.home() / ".cache" / "jaxlm"))


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


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


def file_texts(files, log=None, every: int = 1000):
    """(texts, stats): an iterator over the UTF-8 text of each file, and a dict it fills as it goes
    ("bytes" read as text, "skipped": files skipped as binary or not UTF-8, each named in the log)."""
    stats = {"bytes": 0, "skipped": []}

    t0 = time.perf_counter()

    def texts():
        for i, f in enumerate(files, 1):
            data = Path(f).read_bytes()
            try:
                if b"\0" in data:  # valid UTF-8, but binary
                    raise UnicodeDecodeError("utf-8", data, data.index(b"\0"), data.index(b"\0") + 1, "NUL byte")
                text = data.decode("utf-8")
            except UnicodeDecodeError:
                stats["skipped"].append(f)
                if log is not None:
                    log(f"skipped {f}: binary or not UTF-8 text")
                continue
            stats["bytes"] += len(data)
            if log is not None and i % every == 0:
                progress(i)
            yield text
        if log is not None:
            progress(len(files))

    def progress(i):
        mb, dt = stats["bytes"] / 1e6, time.perf_counter() - t0
        log(f"read {i}/{len(files)} files, {mb:.1f} MB ({mb / max(dt, 1e-9):.1f} MB/s)")

    return texts(), stats


def default_corpus_files() -> list[Path]:
    root = stdlib_dir()
    return sorted(f for f in root.rglob("*.py") if "site-packages" not in f.parts and f.is_file())


def in_validation(key: str, fraction: float) -> bool:
    """The one train / validation split: a document (or file, or example) goes to validation when a
    hash of its key falls in the first ``fraction`` of the range. Deterministic, and stable as
    other documents come and go."""
    return zlib.crc32(key.encode()) % 10_000 < fraction * 10_000


@functools.lru_cache(maxsize=None)
def _builder_class():
    # Defined once, inside the package: tfds registers builders by class name. tfds and grain are
    # imported where data is read (~0.7 s together), not by everything that imports jaxlm.
    import tensorflow_datasets as tfds

    class LocalTextConfig(tfds.core.BuilderConfig):
        def __init__(self, *, files, root, unit, val_fraction, **kwargs):
            super().__init__(**kwargs)
            self.files, self.root, self.unit, self.val_fraction = files, root, unit, val_fraction

    class LocalText(tfds.core.GeneratorBasedBuilder):
        """Plain-text files as a tfds dataset with train / validation splits (split by file)."""

        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return self.dataset_info_from_configs(
                features=tfds.features.FeaturesDict({"text": tfds.features.Text()}))

        def _split_generators(self, dl_manager):
            c = self.builder_config
            val = [f for f in c.files if in_validation(os.path.relpath(f, c.root), c.val_fraction)]
            train = [f for f in c.files if f not in set(val)]
            if not val:  # tiny inputs: keep at least one file for validation
                val, train = train[-1:], train[:-1] or train[-1:]
            return {"train": self._generate_examples(train), "validation": self._generate_examples(val)}

        def _generate_examples(self, files):
            c = self.builder_config
            for f in files:
                text = Path(f).read_bytes().decode("utf-8", errors="replace")
                rel = os.path.relpath(f, c.root)
                if c.unit == "file":
                    if text.strip():
                        yield rel, {"text": text}
                else:
                    for i, line in enumerate(text.splitlines()):
                        if line.strip():
                            yield f"{rel}:{i}", {"text": line}

    return LocalText, LocalTextConfig


def local_text_source(files: list[Path], split: str, *, unit: str = "file", val_fraction: float = 0.05,
                      data_dir=None, name: str | None = None):
    """A tfds data source (random access, no TensorFlow) over local text files."""
    builder_cls, config_cls = _builder_class()
    root = os.path.commonpath([str(f.parent) for f in files]) if files else "."
    config = config_cls(name=name or "t" + files_digest(files, unit, val_fraction), files=[str(f) for f in files],
                        root=root, unit=unit, val_fraction=val_fraction,
                        version=builder_cls.VERSION)
    tfds_dir = Path(data_dir or DEFAULT_DATA_DIR) / "tfds"
    # Several processes of one run may share the disk: one prepares, the others wait and reuse it.
    with file_lock(tfds_dir / f".{config.name}.lock"):
        builder = builder_cls(config=config, data_dir=str(tfds_dir))
        try:
            builder.download_and_prepare(file_format="array_record")
        except AssertionError as e:  # tfds: 'No examples were yielded' for a split
            raise ValueError(f"the data files hold no text ({len(files)} files, from {root})") from e
    return builder.as_data_source(split=split)


@contextlib.contextmanager
def file_lock(path: Path):
    """An exclusive lock (flock) on ``path`` for the duration of the block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def text_source(data_cfg, split: str):
    """(tfds data source, name) of the split: local files, a catalog dataset, or the default corpus."""
    if data_cfg.tfds_name:
        import tensorflow_datasets as tfds  # lazy: see _builder_class

        name = data_cfg.tfds_name.replace("/", "_").replace(":", "_")
        return tfds.data_source(data_cfg.tfds_name, split=split, data_dir=data_cfg.data_dir,
                                download=False), name
    if data_cfg.path:
        files = resolve_paths(data_cfg.path)
        src = local_text_source(files, split, unit=data_cfg.unit, val_fraction=data_cfg.val_fraction,
                                data_dir=data_cfg.data_dir)
        return src, "local_" + files_digest(files, data_cfg.unit, data_cfg.val_fraction)
    name = "stdlib_" + _stdlib_tag()
    return local_text_source(default_corpus_files(), split, unit="file", val_fraction=data_cfg.val_fraction,
                             data_dir=data_cfg.data_dir, name=name), name


def packed_rows(data_cfg, split: str, tokenizer, log=None) -> "PackedRows":
    """The split of ``data_cfg``'s text, tokenized (cached per dataset, split and tokenizer) and
    cut into rows of data.seq_len + 1 tokens."""
    source, name = text_source(data_cfg, split)
    cache = Path(data_cfg.data_dir or DEFAULT_DATA_DIR) / "tokens"
    stream = token_stream(source, tokenizer, cache_dir=cache, tag=f"{name}-{split}-{tokenizer.fingerprint}",
                          text_key=data_cfg.text_key, log=log)
    return PackedRows(stream, data_cfg.seq_len)


def files_digest(files, unit: str, val_fraction: float) -> str:
    """Names a local dataset by its files (path, size, mtime) and split settings."""
    h = hashlib.sha1(f"{unit}:{val_fraction}".encode())
    for f in files:
        st = f.stat()
        h.update(f"{f}:{st.st_size}:{int(st.st_mtime)}".encode())
    return h.hexdigest()[:12]


def _stdlib_tag() -> str:
    return f"py{sys.version_info.major}{sys.version_info.minor}"


def _text_of(example, key: str) -> str:
    v = example[key]
    return v.decode("utf-8", errors="replace") if isinstance(v, bytes) else str(v)


def token_stream(source, tokenizer, *, cache_dir, tag: str, text_key: str = "text",
                 log=None) -> np.ndarray:
    """All documents of ``source`` tokenized and joined with EOS after each one (cached as .npy)."""
    cache = Path(cache_dir) / f"{tag}.npy"
    with file_lock(Path(cache_dir) / f".{tag}.lock"):  # processes sharing the disk tokenize once
        if cache.is_file():
            return np.load(cache, mmap_mode="r")
        for stale in cache.parent.glob(f"{tag}.tmp*.npy"):  # a killed writer's (the lock holder writes)
            stale.unlink()
        return _tokenize(source, tokenizer, cache, text_key, log)


def _tokenize(source, tokenizer, cache: Path, text_key: str, log) -> np.ndarray:
    eos = tokenizer.eos_id
    chunks = []
    n = len(source)
    for start in range(0, n, 256):
        texts = [_text_of(source[i], text_key) for i in range(start, min(n, start + 256))]
        for ids in tokenizer.encode_batch(texts):  # no special tokens inside documents
            chunks.append(np.asarray(ids + [eos], np.int32))
        if log is not None:
            log(f"tokenized {min(n, start + 256)}/{n} documents")
    stream = np.concatenate(chunks) if chunks else np.zeros(0, np.int32)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(f".tmp{os.getpid()}.npy")
    with open(tmp, "wb") as f:  # complete and on disk before it takes the cache's name
        np.save(f, stream)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, cache)
    return stream


class PackedRows:
    """Row i = stream[i * L : i * L + L + 1] (inputs and shifted targets share it)."""

    def __init__(self, stream: np.ndarray, seq_len: int):
        self.stream, self.seq_len = stream, seq_len
        self.n = max(0, (len(stream) - 1) // seq_len)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        i = int(i)
        return np.asarray(self.stream[i * self.seq_len: i * self.seq_len + self.seq_len + 1], np.int32)


class EpochShards:
    """Position g of this host -> a row: epoch e = g // n uses permutation(seed, e) of all rows, and
    host h of H takes every H-th entry of it, so hosts read disjoint rows that cover each epoch."""

    EPOCHS = 100_000  # effectively endless; the training loop decides when to stop

    def __init__(self, rows: PackedRows, *, seed: int, shuffle: bool, process_index: int, process_count: int):
        self.rows, self.seed, self.shuffle = rows, seed, shuffle
        self.h, self.H = process_index, process_count
        self.per_host = len(rows) // process_count
        self._perm = (None, None)

    def __len__(self):
        return self.per_host * self.EPOCHS

    def _permutation(self, epoch):
        if self._perm[0] != epoch:
            n = len(self.rows)
            perm = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
            self._perm = (epoch, perm)
        return self._perm[1]

    def __getitem__(self, g):
        epoch, pos = divmod(int(g), self.per_host)
        return self.rows[self._permutation(epoch)[pos * self.H + self.h]]


def loader(rows: PackedRows, *, batch_size: int, seed: int, shuffle: bool = True,
           process_index: int = 0, process_count: int = 1):
    """A checkpointable grain iterator of [batch_size // process_count, L + 1] int32 batches."""
    import grain  # lazy: see _builder_class

    if batch_size % process_count:
        raise ValueError(f"data.batch_size={batch_size} is not divisible by {process_count} processes")
    if len(rows) < batch_size:
        raise ValueError(f"the data holds {len(rows)} rows (data.seq_len={rows.seq_len}), fewer than "
                         f"data.batch_size={batch_size}; use more text or a smaller batch / seq_len")
    shards = EpochShards(rows, seed=seed, shuffle=shuffle, process_index=process_index,
                         process_count=process_count)
    ds = grain.MapDataset.source(shards).batch(batch_size // process_count, drop_remainder=True)
    # Rows are slices of a memory-mapped array: one reader thread a few batches ahead is plenty
    # (grain's default reads ~500 batches ahead: gigabytes for large batches).
    return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=4)))
