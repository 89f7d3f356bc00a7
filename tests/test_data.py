"""Input pipeline: tfds local text, packing, host shards and resumable iterators."""

import numpy as np
import pytest

from jaxlm.data import PackedRows, loader, local_text_source, resolve_paths, token_stream
from jaxlm.tokenizer import ByteTokenizer


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("docs")
    for i in range(30):
        (d / f"doc{i:02d}.txt").write_text(f"document {i}\n" + "line of text\n" * (i % 5 + 1))
    return d


def test_local_text_splits_by_file_and_by_line(text_dir, tmp_path):
    files = resolve_paths(str(text_dir))
    train = local_text_source(files, "train", val_fraction=0.2, data_dir=tmp_path)
    val = local_text_source(files, "validation", val_fraction=0.2, data_dir=tmp_path)
    texts = sorted(r["text"].decode() for r in list(train) + list(val))
    assert texts == sorted(f.read_text() for f in files) and len(val) > 0
    lines = local_text_source(files, "train", unit="line", val_fraction=0.2, data_dir=tmp_path)
    assert all(b"\n" not in r["text"] for r in lines)
    assert len(resolve_paths(f"{text_dir}/doc0*.txt")) == 10


def test_packing_joins_documents_with_eos(text_dir, tmp_path):
    src = local_text_source(resolve_paths(str(text_dir)), "train", data_dir=tmp_path)
    tok = ByteTokenizer()
    stream = token_stream(src, tok, cache_dir=tmp_path, tag="t")
    assert (stream == tok.eos_id).sum() == len(src)
    rows = PackedRows(stream, 16)
    assert len(rows) == (len(stream) - 1) // 16
    np.testing.assert_array_equal(rows[2], stream[32:49])  # rows overlap by one token (the target)
    np.testing.assert_array_equal(token_stream(src, tok, cache_dir=tmp_path, tag="t"), stream)  # from the cache


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
    """`jaxlm train` killed while it prepares its data (tfds files, then the token cache) at three
    moments: the next preparation gives exactly the tokens of an undisturbed one, and no
    temporary file of the killed run is left in the cache."""
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
    # Preparation takes ~0.3 s from the data dir's creation here (tfds ~0.18 s, then tokens).
    outcomes = [kill_while_writing(["train", *argv(data)], tmp_path / "unused", delay, watch=data)
                for delay in (0.0, 0.17, rng.uniform(0.0, 0.3))]
    assert outcomes[0] == "killed"
    cfg = load_config(None, argv(data))
    tok = ByteTokenizer()
    got = {split: np.asarray(packed_rows(cfg.data, split, tok).stream) for split in ("train", "validation")}
    clean = load_config(None, argv(tmp_path / "clean"))
    for split in ("train", "validation"):
        np.testing.assert_array_equal(got[split], np.asarray(packed_rows(clean.data, split, tok).stream))
    assert not list((data / "tokens").glob("*.tmp*"))
