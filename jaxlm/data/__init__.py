"""Input pipeline: sources -> streaming tokenization into token shards -> packed rows -> mixture ->
grain loader (checkpointable).

- ``sources``: local files (plain text, JSONL, Parquet; gzip / zstd), tfds catalog datasets, the
  default corpus (the Python standard library's own ``.py`` files), cut into units of work.
- ``prepare``: each unit tokenized in bounded memory into token shards (uint16 / uint32) with an
  index; resumable, shared by any number of processes; ``beam`` runs the same units as an Apache
  Beam pipeline.
- ``loader``: rows of ``seq_len + 1`` tokens, shuffled per epoch and split over hosts, mixed by
  weight (``data.mixture``), batched by grain; the iterator state is saved in every checkpoint.
"""

from __future__ import annotations

import os
from pathlib import Path

from jaxlm.data.loader import EpochShards, Mixture, PackedRows, loader  # noqa: F401
from jaxlm.data.prepare import Preparation, TokenShards  # noqa: F401
from jaxlm.data.sources import (Source, default_corpus_files, file_texts, files_source, in_validation,  # noqa: F401
                                resolve_paths, stdlib_dir, stdlib_tag, tfds_source)

DEFAULT_DATA_DIR = Path(os.environ.get("JAXLM_DATA_DIR", Path.home() / ".cache" / "jaxlm"))


def parse_mixture(spec: str) -> list[tuple[str, float]]:
    """"SRC:W,SRC:W" -> [(SRC, W)]; SRC is anything data.path takes (one path, directory or glob) or
    tfds:NAME. Weights are >= 0, not all 0; they need not sum to 1."""
    out = []
    for part in [p.strip() for p in spec.split(",") if p.strip()]:
        src, sep, w = part.rpartition(":")
        try:
            weight = float(w)
        except ValueError:
            weight = None
        if not sep or not src or weight is None:
            raise ValueError(f"data.mixture entry {part!r} is not SRC:WEIGHT (e.g. data/web:0.7,tfds:lm1b:0.3)")
        if not weight >= 0 or weight == float("inf"):
            raise ValueError(f"data.mixture weight of {src} is {w}: weights must be finite and >= 0")
        out.append((src, weight))
    if not out or sum(w for _, w in out) <= 0:
        raise ValueError(f"data.mixture={spec!r} has no source with a weight > 0")
    return out


def data_sources(data_cfg) -> list[tuple[Source, float | None]]:
    """The sources of a data config with their mixture weights (None: a single source)."""
    common = dict(unit=data_cfg.unit, text_key=data_cfg.text_key, val_fraction=data_cfg.val_fraction)
    if data_cfg.mixture:
        if data_cfg.path or data_cfg.tfds_name:
            raise ValueError("set data.mixture or data.path / data.tfds_name, not both")
        return [(tfds_source(src[5:], data_cfg.data_dir, **common) if src.startswith("tfds:")
                 else files_source(src, **common), w) for src, w in parse_mixture(data_cfg.mixture) if w > 0]
    if data_cfg.tfds_name:
        return [(tfds_source(data_cfg.tfds_name, data_cfg.data_dir, **common), None)]
    if data_cfg.path:
        return [(files_source(data_cfg.path, **common), None)]
    return [(Source(files=tuple(map(str, default_corpus_files())), unit="file", val_fraction=data_cfg.val_fraction,
                    label=f"the standard library ({stdlib_tag()})"), None)]


def tokens_dir(data_cfg, source: Source, tokenizer) -> Path:
    return Path(data_cfg.data_dir or DEFAULT_DATA_DIR) / "tokens" / f"{source.digest()}-{tokenizer.fingerprint}"


def prepare_source(source: Source, tokenizer, out, *, workers: int = 1, log=None, chunk_bytes=None) -> dict:
    """Prepare one source's token shards in ``out`` with ``workers`` local processes; returns the
    index. Complete units are kept, so a rerun after a crash only does what is left."""
    prep = Preparation(source, tokenizer, out, chunk_bytes=chunk_bytes)
    if prep.complete():
        return prep.run()
    if log is not None:
        log(f"preparing {source.label or source.root}: {len(prep.units)} unit{'s' * (len(prep.units) != 1)} -> {out}"
            + (f" ({workers} processes)" if workers > 1 else ""))
    procs = []
    if workers > 1:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")  # tokenizers' thread pool does not survive fork
        threads = str(max(1, (os.cpu_count() or 1) // workers))
        old = os.environ.get("RAYON_NUM_THREADS")
        os.environ["RAYON_NUM_THREADS"] = threads
        try:
            procs = [ctx.Process(target=_worker, args=(source, tokenizer, str(out), w, workers, chunk_bytes))
                     for w in range(1, workers)]
            for p in procs:
                p.start()
        finally:
            if old is None:
                os.environ.pop("RAYON_NUM_THREADS", None)
            else:
                os.environ["RAYON_NUM_THREADS"] = old
    try:
        # This process takes its share, then any unit a worker left (a worker that failed leaves
        # its units to this one, which meets the same error or finishes them).
        index = prep.run(log, worker=0, workers=workers)
    finally:
        for p in procs:
            p.join()
    return index


def _worker(source, tokenizer, out, worker, workers, chunk_bytes):
    try:
        Preparation(source, tokenizer, out, chunk_bytes=chunk_bytes).run(None, worker=worker, workers=workers)
    except (ValueError, OSError):  # the main process meets the same error on the units left
        pass


def prepared(data_cfg, tokenizer, log=None, *, workers: int = 1,
             runner=None) -> list[tuple[Source, float | None, Path, dict]]:
    """Every source of the data config prepared: (source, weight, tokens dir, index). By
    ``workers`` local processes, or by ``runner(source, tokenizer, out, log=)`` (e.g. Beam's)."""
    out = []
    for source, weight in data_sources(data_cfg):
        d = tokens_dir(data_cfg, source, tokenizer)
        if runner is not None:
            index = runner(source, tokenizer, d, log=log)
        else:
            index = prepare_source(source, tokenizer, d, workers=workers, log=log)
        if not index["train"]["tokens"]:
            what = (f"tfds dataset {source.tfds_name!r} holds no text" if source.tfds_name
                    else f"the data files hold no text ({len(source.files)} files, from {source.root})")
            raise ValueError(what + (
                f": {len(index['skipped'])} binary or non-UTF-8 files skipped" if index["skipped"] else ""))
        out.append((source, weight, d, index))
    return out


def packed_rows(data_cfg, split: str, tokenizer, log=None):
    """The split of ``data_cfg``'s text, tokenized (prepared once per source and tokenizer) and cut
    into rows of data.seq_len + 1 tokens: PackedRows, or a Mixture of them for data.mixture."""
    parts = [(s, w, PackedRows(TokenShards(d, split), data_cfg.seq_len)) for s, w, d, _ in prepared(data_cfg, tokenizer, log)]
    if parts[0][1] is None:
        return parts[0][2]
    return Mixture([r for _, _, r in parts], [w for _, w, _ in parts], [s.label for s, _, _ in parts])
