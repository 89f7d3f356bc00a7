"""Writing commands under faults (io/atomic.py): SIGKILL at several moments and a full disk leave
DST absent (or as it was) or complete, never partial, and a rerun succeeds; the leftovers of a
killed writer are cleaned up by the next write."""

import contextlib
import json
import os
import random
import resource
import signal
import socket

import numpy as np
import pytest
from safetensors.numpy import load_file

from jaxlm import cli
from jaxlm.io import checksums
from jaxlm.io.atomic import atomic_dir
from jaxlm.io.model_dir import is_model_dir, read_model_dir
from jaxlm.testing import kill_while_writing

# Each writing command, as argv for DST; "src" is a jaxlm model dir, "hf" the HF dir it came from.
COMMANDS = {
    "convert": lambda s, dst: ["convert", s["hf"], dst],
    "export": lambda s, dst: ["export", s["src"], dst],
    "quantize": lambda s, dst: ["quantize", s["src"], dst],
    "prune": lambda s, dst: ["prune", s["src"], dst, "--sparsity", "0.5"],
    "lowrank": lambda s, dst: ["lowrank", s["src"], dst, "--rank", "4"],
}


@pytest.fixture(scope="module")
def sources(hf_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    s = {"hf": hf_dir("GPT2LMHeadModel"), "src": root / "model", "ref": {}, "root": root}
    assert cli.main(["convert", str(s["hf"]), str(s["src"])]) == 0
    return s


def reference(s, command):
    """The command's output written once, undisturbed."""
    if command not in s["ref"]:
        dst = s["root"] / f"ref-{command}"
        assert cli.main(list(map(str, COMMANDS[command](s, dst)))) == 0
        s["ref"][command] = dst
    return s["ref"][command]


def assert_complete(dst, ref):
    """DST holds exactly what an undisturbed run writes (arrays equal, configs equal)."""
    if is_model_dir(ref):
        assert checksums.verify(dst) is True
        (c1, p1, _), (c2, p2, _) = read_model_dir(dst), read_model_dir(ref)
        assert c1 == c2
        flat = lambda p: dict(__import__("jax").tree_util.tree_leaves_with_path(p))  # noqa: E731
        for (k, a), (k2, b) in zip(sorted(flat(p1).items(), key=str), sorted(flat(p2).items(), key=str)):
            assert k == k2
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    else:
        assert json.loads((dst / "config.json").read_text()) == json.loads((ref / "config.json").read_text())
        for f in ref.glob("*.safetensors"):
            got, want = load_file(dst / f.name), load_file(f)
            assert got.keys() == want.keys()
            for k in want:
                np.testing.assert_array_equal(got[k], want[k])


def leftovers(dst):
    return [p.name for p in dst.parent.iterdir() if p.name.startswith(f".{dst.name}.")]


@pytest.mark.parametrize("command", COMMANDS)
def test_sigkill_while_writing_leaves_dst_absent_or_complete(sources, tmp_path, command):
    ref = reference(sources, command)
    rng = random.Random(command)
    dst = tmp_path / "dst"
    outcomes = []
    for delay in (0.0, rng.uniform(0.0, 0.3)):  # at the first file written, and at a random moment after
        outcomes.append(kill_while_writing(COMMANDS[command](sources, dst), dst, delay))
        if dst.exists():  # the rename happened: complete
            assert_complete(dst, ref)
            break
        assert leftovers(dst), "the killed writer left its temporary directory"  # (the next write removes it)
    assert "killed" in outcomes
    proc = cli.main(list(map(str, COMMANDS[command](sources, dst))) + ["--overwrite"])
    assert proc == 0
    assert_complete(dst, ref)
    assert leftovers(dst) == []


@contextlib.contextmanager
def file_size_limit(nbytes):
    """RLIMIT_FSIZE for this process (writes past it fail with EFBIG, as on a full disk)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # orbax's aftermath
@pytest.mark.parametrize("command", COMMANDS)
def test_full_disk_leaves_dst_as_it_was(sources, tmp_path, command, capsys):
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "mine.txt").write_text("the user's file")
    argv = list(map(str, COMMANDS[command](sources, dst))) + ["--overwrite"]
    capsys.readouterr()
    with file_size_limit(64 << 10):  # every model here has an array file over 64 KiB
        code = cli.main(argv)
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("jaxlm ")]
    assert code == 2
    assert err == [f"jaxlm {command}: error: could not write {dst}: File too large; nothing was written "
                   f"({dst} is as it was)"], err
    assert os.listdir(dst) == ["mine.txt"] and (dst / "mine.txt").read_text() == "the user's file"
    assert leftovers(dst) == []
    assert cli.main(argv) == 0  # with room again
    assert_complete(dst, reference(sources, command))


def test_next_write_recovers_a_killed_overwrite(tmp_path):
    """Killed between the two renames of an overwrite: the previous DST is put back before the
    next write, so DST is never lost; a dead writer's temporary directory is removed."""
    dst = tmp_path / "out"
    dead = 2 ** 22 + 12345  # above the usual pid_max: no such process
    while True:
        try:
            os.kill(dead, 0)
            dead += 1
        except ProcessLookupError:
            break
    host = socket.gethostname()
    old = tmp_path / f".out.old-{host}-{dead}-abcd1234"
    old.mkdir()
    (old / "config.json").write_text("{}")
    tmp = tmp_path / f".out.tmp-{host}-{dead}-abcd1234"
    tmp.mkdir()
    alive = tmp_path / f".out.tmp-{host}-{os.getpid()}-abcd1234"  # a live writer's: untouched
    alive.mkdir()
    with pytest.raises(FileExistsError, match="exists and is not empty"):
        with atomic_dir(dst):
            pass
    assert (dst / "config.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == [alive.name, "out"]
