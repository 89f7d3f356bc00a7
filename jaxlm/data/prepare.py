"""Streaming preparation: documents -> batched tokenization -> token shards on disk.

``prepare(source, tokenizer, cache)`` writes ``CACHE/<source digest>-<tokenizer>/``:

- ``{split}-{k:05d}.bin``: the tokens of unit k's documents of that split, each document followed
  by EOS, as raw little-endian uint16 (uint32 when the vocabulary exceeds 65,536 ids);
- ``unit-{k:05d}.json``: unit k is complete (token / document counts and the SHA-256 of its shards);
  written last, after the shards are renamed into place and synced, so a half-written shard
  (``.tmp-*``) is never read;
- ``index.json``: every unit is complete: the shards of each split, in unit order, and totals.

Memory stays bounded by one batch of text (``BATCH_BYTES``) and its tokens, whatever the corpus
size. Units are claimed with an exclusive ``flock`` on ``.unit-k.lock``, so several processes
(``workers``, the processes of a multi-host run, or separate commands) share the work, a unit
whose process died is taken over, and a rerun skips complete units. The shards of a unit depend
only on its input, so any split of the work gives byte-identical files.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import queue
import threading
import time
from pathlib import Path

import numpy as np

from jaxlm.data.sources import CHUNK_BYTES, Source, documents, plan, validation_files

FORMAT = "jaxlm-tokens-v1"
BATCH_BYTES = 4 << 20  # text per encode_batch call
SPLITS = ("train", "validation")


def token_dtype(vocab_size: int):
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def encode_docs(tokenizer, texts, dtype) -> np.ndarray:
    """The documents' ids, each followed by EOS, as one flat array."""
    eos = tokenizer.eos_id
    if getattr(tokenizer, "fingerprint", None) == "byte":  # UTF-8 bytes are the ids: no Python lists
        raw = [np.frombuffer(t.encode("utf-8"), np.uint8) for t in texts]
        out = np.empty(sum(map(len, raw)) + len(raw), dtype)
        ends = np.cumsum([len(r) + 1 for r in raw])
        for r, e in zip(raw, ends):
            out[e - 1 - len(r): e - 1] = r
        out[ends - 1] = eos
        return out
    ids = tokenizer.encode_batch(texts)
    out = np.empty(sum(map(len, ids)) + len(ids), dtype)
    pos = 0
    for x in ids:
        out[pos: pos + len(x)] = x
        out[pos + len(x)] = eos
        pos += len(x) + 1
    return out


@contextlib.contextmanager
def try_lock(path: Path, block: bool):
    """An exclusive flock on path (True), or False at once if another process holds it and not block."""
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if block else fcntl.LOCK_NB))
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _fsync_write(path: Path, data: bytes):
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(d: Path):
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _batches(docs, limit: int):
    """Lists of (split, text) holding about `limit` bytes of text each."""
    batch, held = [], 0
    for split, text in docs:
        batch.append((split, text))
        held += len(text)
        if held >= limit:
            yield batch
            batch, held = [], 0
    if batch:
        yield batch


def _prefetched(it, depth: int = 2):
    """Iterate `it` in a thread (reading, decompressing and parsing overlap tokenization, which
    releases the GIL); its exceptions are raised here."""
    q: queue.Queue = queue.Queue(depth)
    done = object()

    def run():
        try:
            for x in it:
                q.put(x)
            q.put(done)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            q.put(e)

    threading.Thread(target=run, daemon=True).start()
    while (x := q.get()) is not done:
        if isinstance(x, BaseException):
            raise x
        yield x


class Preparation:
    """The token shards of one source and tokenizer in ``out``; see the module docstring."""

    def __init__(self, source: Source, tokenizer, out, *, chunk_bytes: int | None = None):
        self.source, self.tokenizer, self.out = source, tokenizer, Path(out)
        self.dtype = token_dtype(tokenizer.vocab_size)
        self.units = plan(source, chunk_bytes or CHUNK_BYTES)
        self._val_files = None

    def meta_path(self, k):
        return self.out / f"unit-{k:05d}.json"

    def done(self, k) -> bool:
        return self.meta_path(k).is_file()

    def complete(self) -> bool:
        return (self.out / "index.json").is_file()

    def prepare_unit(self, k: int) -> dict:
        """Tokenize unit k into its shards (the caller holds its lock)."""
        if self._val_files is None:
            self._val_files = validation_files(self.source)
        for stale in self.out.glob(f".tmp-*-{k:05d}-*"):  # a dead writer's
            stale.unlink()
        stats = {"bytes": 0, "skipped": []}
        tmp = {s: self.out / f".tmp-{s}-{k:05d}-{os.getpid()}" for s in SPLITS}
        digests = {s: hashlib.sha256() for s in SPLITS}
        counts = {s: {"tokens": 0, "docs": 0} for s in SPLITS}
        files = {s: open(tmp[s], "wb") for s in SPLITS}
        try:
            docs = documents(self.source, self.units[k], stats, self._val_files)
            for batch in _prefetched(_batches(docs, BATCH_BYTES)):
                for s in SPLITS:
                    texts = [t for split, t in batch if split == s]
                    if not texts:
                        continue
                    ids = encode_docs(self.tokenizer, texts, self.dtype)
                    data = ids.tobytes()
                    files[s].write(data)
                    digests[s].update(data)
                    counts[s]["tokens"] += len(ids)
                    counts[s]["docs"] += len(texts)
            for f in files.values():
                f.flush()
                os.fsync(f.fileno())
        finally:
            for f in files.values():
                f.close()
        for s in SPLITS:
            os.replace(tmp[s], self.out / f"{s}-{k:05d}.bin")
        _fsync_dir(self.out)
        meta = {s: {**counts[s], "sha256": digests[s].hexdigest()} for s in SPLITS}
        meta |= {"bytes": stats["bytes"], "skipped": [str(f) for f in stats["skipped"]]}
        part = self.out / f".tmp-meta-{k:05d}-{os.getpid()}"
        _fsync_write(part, json.dumps(meta).encode())
        os.replace(part, self.meta_path(k))
        _fsync_dir(self.out)
        return meta

    def _check_plan(self):
        """The units of a resumed preparation must be the ones its complete units were made of."""
        digest = hashlib.sha256(json.dumps(self.units).encode()).hexdigest()[:16]
        path = self.out / "plan.json"
        with try_lock(self.out / ".index.lock", True):
            for stale in [*self.out.glob(".tmp-plan-*"), *self.out.glob(".tmp-index-*")]:  # dead writers'
                stale.unlink()
            if not path.is_file():
                part = self.out / f".tmp-plan-{os.getpid()}"
                _fsync_write(part, json.dumps({"units": len(self.units), "digest": digest}).encode())
                os.replace(part, path)
        was = json.loads(path.read_text())
        if was["digest"] != digest:
            raise ValueError(f"{self.out} holds a preparation cut into {was['units']} other units (another chunk "
                             f"size): prepare into another data.data_dir, or remove that directory")

    def write_index(self) -> dict:
        metas = [json.loads(self.meta_path(k).read_text()) for k in range(len(self.units))]
        index = {"format": FORMAT, "dtype": self.dtype.str, "vocab_size": self.tokenizer.vocab_size,
                 "eos_id": self.tokenizer.eos_id, "tokenizer": self.tokenizer.fingerprint,
                 "source": self.source.label or (self.source.tfds_name or self.source.root),
                 "units": len(self.units), "bytes": sum(m["bytes"] for m in metas),
                 "skipped": sorted({f for m in metas for f in m["skipped"]})}
        for s in SPLITS:
            index[s] = {"tokens": sum(m[s]["tokens"] for m in metas), "docs": sum(m[s]["docs"] for m in metas),
                        "shards": [f"{s}-{k:05d}.bin" for k, m in enumerate(metas) if m[s]["tokens"]]}
        part = self.out / f".tmp-index-{os.getpid()}"
        _fsync_write(part, json.dumps(index, indent=1).encode())
        os.replace(part, self.out / "index.json")
        _fsync_dir(self.out)
        return index

    def run(self, log=None, *, worker: int = 0, workers: int = 1) -> dict:
        """Prepare every unit not yet complete (this process's share first, then any left by
        others, waiting for units other processes hold), then the index. Returns the index."""
        self.out.mkdir(parents=True, exist_ok=True)
        if self.complete():
            return json.loads((self.out / "index.json").read_text())
        self._check_plan()
        n = len(self.units)
        meter = _Meter(self, log)
        order = list(range(worker, n, workers)) + [k for k in range(n) if k % workers != worker]
        for block in (False, True):  # first skip units others hold; then wait for them
            for k in order:
                if self.done(k):
                    continue
                with try_lock(self.out / f".unit-{k:05d}.lock", block) as got:
                    if got and not self.done(k):
                        meter.unit(k, self.prepare_unit(k))
        with try_lock(self.out / ".index.lock", True):
            if not self.complete():
                index = self.write_index()
                meter.finish(index)
        return json.loads((self.out / "index.json").read_text())


class _Meter:
    """Progress lines (units, MB/s of text, tokens/s, ETA) every few seconds."""

    def __init__(self, prep: Preparation, log, every: float = 5.0):
        self.prep, self.log, self.every = prep, log, every
        self.t0 = self.last = time.perf_counter()
        self.bytes = self.tokens = 0

    def unit(self, k, meta):
        self.bytes += meta["bytes"]
        self.tokens += meta["train"]["tokens"] + meta["validation"]["tokens"]
        for f in meta["skipped"]:
            if self.log:
                self.log(f"skipped {f}: binary or not UTF-8 text")
        now = time.perf_counter()
        if self.log and (now - self.last >= self.every or k == len(self.prep.units) - 1):
            self.last = now
            done = sum(self.prep.done(j) for j in range(len(self.prep.units)))
            dt = max(now - self.t0, 1e-9)
            rate = self.bytes / dt
            left = sum(_unit_bytes(u) for j, u in enumerate(self.prep.units) if not self.prep.done(j))
            eta = f", ETA {left / rate:.0f} s" if rate > 0 and left else ""
            self.log(f"prepared {done}/{len(self.prep.units)} units: {self.bytes / 1e6:.1f} MB of text at "
                     f"{rate / 1e6:.1f} MB/s, {self.tokens / dt / 1e3:.0f}k tokens/s{eta}")

    def finish(self, index):
        if self.log:
            skipped = f"; skipped {len(index['skipped'])} binary or non-UTF-8 files" if index["skipped"] else ""
            self.log(f"tokens in {self.prep.out}: train {index['train']['tokens']:,} ({index['train']['docs']:,} "
                     f"documents), validation {index['validation']['tokens']:,} "
                     f"({index['validation']['docs']:,}){skipped}")


def _unit_bytes(unit) -> int:
    total = 0
    for piece in unit:
        if piece[0] == "file":
            _, f, a, b = piece
            total += (b if b is not None else os.path.getsize(f)) - a
        else:
            total += piece[3] - piece[2]
    return total


class TokenShards:
    """One split of prepared tokens as one read-only array: memory-mapped shards, sliced across
    their boundaries."""

    def __init__(self, out, split: str):
        self.out = Path(out)
        index = json.loads((self.out / "index.json").read_text())
        if index.get("format") != FORMAT:
            raise ValueError(f"{self.out} holds tokens of format {index.get('format')!r}, not {FORMAT}")
        self.index, self.dtype = index, np.dtype(index["dtype"])
        self.maps = [np.memmap(self.out / name, self.dtype, mode="r") for name in index[split]["shards"]]
        self.starts = np.cumsum([0] + [len(m) for m in self.maps])
        self.shape = (int(self.starts[-1]),)

    def __len__(self):
        return self.shape[0]

    def __getitem__(self, key):
        if not isinstance(key, slice):
            return self[key: key + 1][0] if key >= 0 else self[len(self) + key]
        a, b, step = key.indices(len(self))
        if step != 1:
            raise ValueError("token shards slice with step 1 only")
        if b <= a:
            return np.zeros(0, self.dtype)
        i = int(np.searchsorted(self.starts, a, side="right")) - 1
        parts = []
        while a < b:
            lo = a - self.starts[i]
            hi = min(b, self.starts[i + 1]) - self.starts[i]
            parts.append(self.maps[i][lo:hi])
            a = self.starts[i] + hi
            i += 1
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def __array__(self, dtype=None, copy=None):
        out = self[0: len(self)]
        return np.asarray(out, dtype) if dtype is not None else np.asarray(out)
