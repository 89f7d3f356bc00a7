"""Multi-process training on this machine: two processes joined by jax.distributed (127.0.0.1
coordinator, gloo collectives, 2 simulated CPU devices each) against one process of 4 devices."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from jaxlm.distributed import initialize, multi_process_env

from conftest import TEST_XLA_FLAGS

# Runs `jaxlm train` and records which training rows this process read (epoch, row, rows in all).
DRIVER = """
import json, sys
import jaxlm.data as d
seen, orig = [], d.EpochShards.__getitem__
def record(self, g):
    if self.shuffle:
        epoch, pos = divmod(int(g), self.per_host)
        seen.append([epoch, int(self._permutation(epoch)[pos * self.H + self.h]), len(self.rows)])
    return orig(self, g)
d.EpochShards.__getitem__ = record
from jaxlm.cli import main
rc = main(sys.argv[2:])
open(sys.argv[1], "w").write(json.dumps(seen))
sys.exit(rc)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tiny_text(tmp_path_factory):
    from jaxlm.data import stdlib_dir

    root = tmp_path_factory.mktemp("tiny")
    (root / "text").mkdir()
    for i, f in enumerate(sorted(stdlib_dir().glob("*.py"))[:20]):
        (root / "text" / f"{i:02d}.txt").write_text(f.read_text()[:200])
    return root


def _args(root, seq_len):
    return ["model=gpt2-tiny", "model.vocab_size=259", "model.d_model=32", "model.n_layers=2", "model.n_heads=4",
            "model.max_len=32", "model.dropout=0", "model.attention_dropout=0", f"data.seq_len={seq_len}",
            "data.batch_size=16", "data.val_fraction=0.3", f"data.path={root / 'text'}",
            f"data.data_dir={root / 'cache'}", "train.steps=8", "train.eval_every=4", "train.eval_batches=1",
            "train.save_every=4", "train.log_every=1"]


def _even_rows_seq_len(root):
    """A seq_len whose training split has an even number of rows: then 2 hosts x n/2 rows cover
    exactly the epoch that 1 host reads, and the runs see the same rows across the epoch boundary."""
    from jaxlm.config import load_config
    from jaxlm.data import packed_rows
    from jaxlm.tokenizer import ByteTokenizer

    for seq_len in range(32, 24, -1):
        n = len(packed_rows(load_config(None, _args(root, seq_len)).data, "train", ByteTokenizer()))
        if n % 2 == 0:
            return seq_len, n
    raise AssertionError("no seq_len in 25..32 gives an even number of rows")


def test_two_processes_train_like_one_process_of_four_devices(tiny_text, tmp_path):
    from jaxlm.config import load_config
    from jaxlm.train import train

    seq_len, n_rows = _even_rows_seq_len(tiny_text)
    args = _args(tiny_text, seq_len)
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    (tmp_path / "defaults.yaml").write_text("{}\n")  # the library defaults, not the quickstart's
    port = _free_port()
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count=2 {TEST_XLA_FLAGS}",
           "JAX_PLATFORMS": "cpu"}
    procs, logs = [], []
    try:
        for i in range(2):
            logs.append(open(tmp_path / f"log{i}.txt", "w+"))
            procs.append(subprocess.Popen(
                [sys.executable, str(driver), str(tmp_path / f"rows{i}.json"), "train", "--config", str(tmp_path / "defaults.yaml"), *args,
                 f"train.workdir={tmp_path / 'two'}", "--coordinator", f"127.0.0.1:{port}",
                 "--num-processes", "2", "--process-id", str(i)], env=env, stdout=logs[i], stderr=subprocess.STDOUT))
        for p in procs:
            p.wait(timeout=300)
    finally:
        for p in procs:  # never leave a process behind, whatever happened
            if p.poll() is None:
                p.kill()
                p.wait()
    text = [(tmp_path / f"log{i}.txt").read_text() for i in range(2)]
    assert [p.returncode for p in procs] == [0, 0], text[0][-2000:] + text[1][-2000:]
    # Only process 0 reports.
    assert "step 8/8" in text[0] and "step " not in text[1]

    one = tmp_path / "one"
    train(load_config(None, [*args, "mesh.data=4", f"train.workdir={one}"]), log=lambda m: None)  # 4 of 8 devices

    def losses(w):
        return [(r["step"], r.get("loss", r.get("val_loss"))) for r in map(json.loads, open(w / "metrics.jsonl"))]

    two_l, one_l = losses(tmp_path / "two"), losses(one)
    assert [s for s, _ in two_l] == [s for s, _ in one_l]  # every record written once
    np.testing.assert_allclose([v for _, v in two_l], [v for _, v in one_l], rtol=1e-5)

    # Each host read its own rows: in epoch 0 none twice, none shared, none missing.
    per_host = []
    for i in range(2):
        seen = json.loads((tmp_path / f"rows{i}.json").read_text())
        assert seen and all(n == n_rows for _, _, n in seen)
        rows = [r for e, r, _ in seen if e == 0]
        assert len(rows) == len(set(rows)) == n_rows // 2
        per_host.append(set(rows))
    assert not per_host[0] & per_host[1]
    assert per_host[0] | per_host[1] == set(range(n_rows))


def test_both_processes_refuse_a_workdir_another_run_holds(tiny_text, tmp_path):
    """Process 0 finds the workdir locked (here by this test process): it and process 1 both exit
    2 at once with one line, instead of process 1 waiting forever for a process 0 that left."""
    from jaxlm.io.lock import WorkdirLock

    held = WorkdirLock(tmp_path / "w")
    port = _free_port()
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count=2 {TEST_XLA_FLAGS}",
           "JAX_PLATFORMS": "cpu"}
    procs = [subprocess.Popen([sys.executable, "-m", "jaxlm.cli", "train", *_args(tiny_text, 32),
                               f"train.workdir={tmp_path / 'w'}", "--coordinator", f"127.0.0.1:{port}",
                               "--num-processes", "2", "--process-id", str(i)],
                              env=env, stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        errs = [p.communicate(timeout=120)[1] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        held.release()
    assert [p.returncode for p in procs] == [2, 2], errs
    last = [e.strip().splitlines()[-1] for e in errs]
    assert last[0].startswith(f"jaxlm train: error: {tmp_path / 'w'} is in use by a running jaxlm train (host "), errs[0]
    assert last[1] == (f"jaxlm train: error: {tmp_path / 'w'} is in use by another jaxlm train (process 0 found it "
                       "locked)"), errs[1]
    assert "Traceback" not in errs[0] + errs[1]


def test_distributed_flags_go_together():
    with pytest.raises(ValueError, match="go together"):
        initialize("127.0.0.1:1234", None, None)
    with pytest.raises(ValueError, match="must be HOST:PORT"):
        initialize("127.0.0.1", 2, 0)
    with pytest.raises(ValueError, match=r"--process-id=2 must be in \[0, 2\)"):
        initialize("127.0.0.1:1234", 2, 2)
    assert initialize() is False  # a single process: nothing to join


def test_cluster_detection(monkeypatch):
    for k in ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "TPU_WORKER_HOSTNAMES", "JAX_COORDINATOR_ADDRESS"):
        monkeypatch.delenv(k, raising=False)
    assert multi_process_env() is None
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("SLURM_STEP_NODELIST", "node[001-002]")
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert multi_process_env() is None  # one task: a single process
    monkeypatch.setenv("SLURM_NTASKS", "2")
    assert multi_process_env() == "slurm"
    monkeypatch.delenv("SLURM_JOB_ID")
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "10.0.0.2,10.0.0.3")
    assert multi_process_env() == "tpu"
