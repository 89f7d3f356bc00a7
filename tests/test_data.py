"""Input pipeline: sources in every format, streaming preparation into token shards (resumable,
shared by processes, the same under Beam), packing, mixtures, host shards and resumable iterators."""

import gzip
import hashlib
import json

import numpy as np
import pytest

from jaxlm.data import (Mixture, PackedRows, TokenShards, files_source, loader, prepare_source,
                        tfds_source)
from jaxlm.tokenizer import ByteTokenizer


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """One corpus in every input format: {path: [documents]} of the files jaxlm should read."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    d = tmp_path_factory.mktemp("formats")
    docs = {}
    for i in range(6):
        docs[d / f"doc{i}.txt"] = [f"plain text file {i}\n" + "line of text\n" * (i + 1)]
    docs[d / "web.jsonl"] = [f"json document {i} " + "word " * (i % 40) for i in range(400)]
    (d / "web.jsonl").write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(docs[d / "web.jsonl"])))
    docs[d / "more.jsonl.gz"] = [f"gzip document {i} \u00e9\u4e2d" for i in range(50)]
    with gzip.open(d / "more.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in docs[d / "more.jsonl.gz"])
    docs[d / "notes.txt.zst"] = ["zstd compressed text\n" * 5]
    (d / "notes.txt.zst").write_bytes(zstandard.ZstdCompressor().compress(docs[d / "notes.txt.zst"][0].encode()))
    docs[d / "table.parquet"] = [f"parquet row {i}" for i in range(120)]
    pq.write_table(pa.table({"n": list(range(120)), "text": docs[d / "table.parquet"]}), d / "table.parquet")
    for f, texts in docs.items():
        if f.suffix == ".txt":
            f.write_text(texts[0])
    (d / "blob.bin").write_bytes(bytes(range(256)) * 3)  # not UTF-8: skipped and counted
    return d, docs


def decoded_docs(out, split):
    eos = ByteTokenizer.eos_id
    stream = np.asarray(TokenShards(out, split))
    ends = np.flatnonzero(stream == eos)
    return [bytes(stream[a:b].astype(np.uint8)).decode() for a, b in zip(np.r_[0, ends[:-1] + 1], ends)]


def test_every_format_is_read_split_and_cut_into_units_without_changing_the_tokens(corpus, tmp_path):
    root, docs = corpus
    src = files_source(str(root))
    index = prepare_source(src, ByteTokenizer(), tmp_path / "one")
    got = decoded_docs(tmp_path / "one", "train") + decoded_docs(tmp_path / "one", "validation")
    assert sorted(got) == sorted(t for texts in docs.values() for t in texts)  # every document, once
    assert index["skipped"] == [str(root / "blob.bin")] and index["dtype"] == "<u2"
    assert index["validation"]["docs"] > 0 and index["train"]["docs"] > 10 * index["validation"]["docs"]
    # 700-byte units: the JSONL file split at line boundaries, the small files grouped. Same tokens, same split.
    index2 = prepare_source(src, ByteTokenizer(), tmp_path / "many", chunk_bytes=700)
    assert index2["units"] > 20 and index["units"] == 1
    for split in ("train", "validation"):
        np.testing.assert_array_equal(np.asarray(TokenShards(tmp_path / "many", split)),
                                      np.asarray(TokenShards(tmp_path / "one", split)))
    rows = PackedRows(TokenShards(tmp_path / "many", "train"), 16)  # rows cross shard boundaries
    stream = np.asarray(TokenShards(tmp_path / "one", "train"))
    for i in (0, 5, len(rows) // 2, len(rows) - 1):
        np.testing.assert_array_equal(rows[i], stream[16 * i: 16 * i + 17])


def shard_digests(out):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("*.bin"))}


def test_workers_and_beam_write_the_shards_of_one_process(corpus, tmp_path):
    """2 local processes, and the Beam DirectRunner with 2 worker processes: byte-identical shards
    (same names, same SHA-256) and the same index as one process."""
    from jaxlm.data.beam import prepare_with_beam

    src = files_source(str(corpus[0]))
    one = prepare_source(src, ByteTokenizer(), tmp_path / "one", chunk_bytes=2000)
    two = prepare_source(src, ByteTokenizer(), tmp_path / "two", chunk_bytes=2000, workers=2)
    beam = prepare_with_beam(src, ByteTokenizer(), tmp_path / "beam",
                             ["--direct_num_workers=2", "--direct_running_mode=multi_processing"], chunk_bytes=2000)
    assert one["units"] > 4 and one == two == beam
    assert shard_digests(tmp_path / "one") == shard_digests(tmp_path / "two") == shard_digests(tmp_path / "beam")


def test_killed_preparation_resumes_to_identical_shards(corpus, tmp_path):
    """A preparation killed with SIGKILL at 3 moments (at its first completed unit, then at seeded
    random times of 10-30% of its duration after it), rerun after each: the shards equal an undisturbed
    preparation's; finished units are kept."""
    import random
    import subprocess
    import sys
    import time

    src_dir = corpus[0]
    want = prepare_source(files_source(str(src_dir)), ByteTokenizer(), tmp_path / "clean", chunk_bytes=300)
    # The killed runs take `pace` seconds per unit (a sleep before each), so the kill moments fall inside
    # the work however fast or loaded this machine is (unthrottled, the units took milliseconds and a
    # busy moment let a run finish before its kill).
    pace = 0.01
    code = ("import sys, time; from jaxlm.data import files_source, prepare_source; "
            "from jaxlm.data.prepare import Preparation; from jaxlm.tokenizer import ByteTokenizer; "
            "unit = Preparation.prepare_unit; "
            f"Preparation.prepare_unit = lambda self, k: (time.sleep({pace}), unit(self, k))[1]; "
            "prepare_source(files_source(sys.argv[1]), ByteTokenizer(), sys.argv[2], chunk_bytes=300)")
    took = want["units"] * pace
    out = tmp_path / "killed"
    rng = random.Random(0)
    kept = []
    for delay in (0.0, rng.uniform(0.1, 0.3) * took, rng.uniform(0.1, 0.3) * took):
        done_before = len(list(out.glob("unit-*.json")))
        proc = subprocess.Popen([sys.executable, "-c", code, str(src_dir), str(out)])
        # Work began: a unit completed (temporary shards live for microseconds and a killed run's
        # stay until the next run, past its imports, removes them: they cannot tell).
        while proc.poll() is None and len(list(out.glob("unit-*.json"))) <= done_before:
            time.sleep(0.002)
        time.sleep(delay)
        proc.kill()
        proc.wait()
        kept.append(len(list(out.glob("unit-*.json"))))
    assert 0 < kept[0] <= kept[1] <= kept[2] < want["units"] and not (out / "index.json").exists(), kept
    assert prepare_source(files_source(str(src_dir)), ByteTokenizer(), out, chunk_bytes=300) == want
    assert shard_digests(out) == shard_digests(tmp_path / "clean") and not list(out.glob(".tmp-*"))
    print("units complete at each kill:", kept, "of", want["units"])


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    from jaxlm.testing import prepare_tiny_tfds

    d = tmp_path_factory.mktemp("tfds")
    prepare_tiny_tfds(d)
    return d


def test_tfds_catalog_dataset_by_name(tfds_dir, tmp_path):
    index = prepare_source(tfds_source("jaxlm_test_text", tfds_dir), ByteTokenizer(), tmp_path / "t")
    assert (index["train"]["docs"], index["validation"]["docs"]) == (60, 10)  # its own train / test splits
    assert sorted(decoded_docs(tmp_path / "t", "validation")) == sorted(f"catalog example {i}" for i in range(60, 70))


def test_mixture_shares_and_exact_resume(tmp_path):
    """Three sources at 0.5 / 0.3 / 0.2: over 10,000 rows each share is within 1 point; the
    iterator restored from its state continues with the same batches."""
    parts = []
    for j, fill in enumerate("abc"):
        (tmp_path / fill).mkdir()
        (tmp_path / fill / "x.txt").write_text(fill * 3000)
        prepare_source(files_source(str(tmp_path / fill), val_fraction=0), ByteTokenizer(), tmp_path / f"t{j}")
        parts.append(PackedRows(TokenShards(tmp_path / f"t{j}", "train"), 8))
    mix = Mixture(parts, [0.5, 0.3, 0.2], ["a", "b", "c"])
    it = loader(mix, batch_size=10, seed=1)
    rows = np.concatenate([next(it) for _ in range(1000)])
    shares = [np.mean(rows[:, 0] == ord(c)) for c in "abc"]
    print("shares over 10,000 rows:", shares)
    assert all(abs(s - w) <= 0.01 for s, w in zip(shares, (0.5, 0.3, 0.2)))
    state = it.get_state()
    want = [next(it) for _ in range(20)]
    again = loader(mix, batch_size=10, seed=1)
    again.set_state(state)
    for a, b in zip(want, (next(again) for _ in range(20))):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("setting, message", [
    ("data.path={d}/nofield.jsonl", r"nofield.jsonl:3 has no 'text' field \(fields: id, body\); set data.text_key"),
    ("data.path={d}/broken.jsonl", r"broken.jsonl:2 is not a JSON object"),
    ("data.path={d}/array.jsonl", r"array.jsonl:1 is not a JSON object$"),
    ("data.path={d}/nocol.parquet", r"nocol.parquet has no column 'text' \(columns: body\); set data.text_key"),
    ("data.path={d}/empty", r"the data files hold no text \(1 files"),
    ("data.path={d}/binary", r"the data files hold no text \(1 files, .*: 1 binary or non-UTF-8 files skipped"),
    ("data.mixture={d}/empty:-1,{d}/nofield.jsonl:1", r"data.mixture weight of .*empty is -1: weights must be finite and >= 0"),
    ("data.mixture={d}/empty:0,{d}/nofield.jsonl:0", r"data.mixture=.* has no source with a weight > 0"),
    ("data.mixture={d}/empty", r"data.mixture entry .* is not SRC:WEIGHT"),
    ("data.tfds_name=no_such_dataset_here", r"data.tfds_name='no_such_dataset_here' is not a tensorflow-datasets catalog"),
])
def test_bad_data_is_one_line_and_writes_no_tokens(cli, tmp_path, setting, message):
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = tmp_path
    (d / "nofield.jsonl").write_text('{"text": "a"}\n\n{"id": 1, "body": "b"}\n')
    (d / "broken.jsonl").write_text('{"text": "a"}\n{"text": \n')
    (d / "array.jsonl").write_text('["a", "b"]\n')
    pq.write_table(pa.table({"body": ["x"]}), d / "nocol.parquet")
    (d / "empty").mkdir()
    (d / "empty" / "a.txt").write_text("  \n")
    (d / "binary").mkdir()
    (d / "binary" / "a.txt").write_bytes(b"\xff\xfe\x00text")
    proc = cli("data", "prepare", setting.format(d=d), f"data.data_dir={d / 'cache'}")
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[-1].startswith("jaxlm data prepare: error: ") and sum("error" in x for x in lines) == 1, lines
    assert __import__("re").search(message, lines[-1]), lines[-1]
    assert not [p for p in (d / "cache").rglob("*.bin") if p.stat().st_size]  # no tokens written


def test_host_shards_are_disjoint_and_cover_each_epoch():
    rows = PackedRows(np.arange(10 * 4 + 1), 4)  # 10 rows, row i starts with 4 * i
    n_hosts, per_host_batch = 2, 1
    seen = []
    for h in range(n_hosts):
        it = loader(rows, batch_size=n_hosts * per_host_batch, seed=3, process_index=h, process_count=n_hosts)
        seen.append([int(next(it)[0, 0]) // 4 for _ in range(5)])  # one epoch: 10 rows / 2 hosts
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(10))
    it = loader(rows, batch_size=2, seed=3)
    epochs = [[int(r[0]) // 4 for _ in range(5) for r in next(it)] for _ in range(2)]
    assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(10)) and epochs[0] != epochs[1]


def test_resumed_iterator_yields_the_same_rows():
    rows = PackedRows(np.arange(200 * 8 + 1), 8)
    it = loader(rows, batch_size=4, seed=0)
    for _ in range(7):
        next(it)
    state = it.get_state()
    want = [next(it) for _ in range(30)]  # crosses an epoch boundary (50 batches per epoch)
    again = loader(rows, batch_size=4, seed=0)
    again.set_state(state)
    for a, b in zip(want, (next(again) for _ in range(30))):
        np.testing.assert_array_equal(a, b)


def test_too_little_data_is_named():
    with pytest.raises(ValueError, match=r"the data holds 3 rows \(data.seq_len=8\), fewer than data.batch_size=8"):
        loader(PackedRows(np.arange(30), 8), batch_size=8, seed=0)


def test_sigkill_during_data_preparation_leaves_no_partial_cache(tmp_path):
    """`jaxlm train` killed while it prepares its data (token shards) at two moments: the next
    preparation gives exactly the tokens of an undisturbed one, and no temporary file of the killed
    run is left in the cache."""
    import random
    import shutil

    from jaxlm.config import load_config
    from jaxlm.data import packed_rows, stdlib_dir
    from jaxlm.testing import kill_while_writing

    text = tmp_path / "text"
    text.mkdir()
    for f in sorted(stdlib_dir().glob("*.py"))[:60]:
        shutil.copy(f, text / f.name)
    argv = lambda d: ["model=gpt2-tiny", "model.vocab_size=259", "model.d_model=32", "model.n_layers=1",  # noqa: E731
                      "model.n_heads=2", "model.max_len=32", "data.seq_len=32", "data.batch_size=8",
                      f"data.path={text}", f"data.data_dir={d}", "train.steps=1", "train.eval_every=0",
                      f"train.workdir={tmp_path / 'run'}"]
    data = tmp_path / "data"
    rng = random.Random(0)
    outcomes = [kill_while_writing(["train", *argv(data)], tmp_path / "unused", delay, watch=data)
                for delay in (0.0, rng.uniform(0.0, 0.1))]
    assert outcomes[0] == "killed"
    cfg = load_config(None, argv(data))
    tok = ByteTokenizer()
    got = {split: np.asarray(packed_rows(cfg.data, split, tok).stream) for split in ("train", "validation")}
    clean = load_config(None, argv(tmp_path / "clean"))
    for split in ("train", "validation"):
        np.testing.assert_array_equal(got[split], np.asarray(packed_rows(clean.data, split, tok).stream))
    assert not list((data / "tokens").rglob(".tmp-*"))
