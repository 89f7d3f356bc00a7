"""A deliberate fault sweep over everything jaxlm writes; prints the table of the README's
"Reliability" section (fault, how it was injected, times tried, outcome, data lost).

    python scripts/fault_sweep.py [--kills 6] [--flips 40] [--out DIR]

- SIGKILL at random moments of `jaxlm convert | export | quantize | prune | lowrank` (a GPT-2-shaped
  model with random weights, 12.8 MB of float32) and of the data preparation of `jaxlm train`: after
  each kill DST must be absent or equal to an undisturbed run's output, never partial; the last
  state is then rerun (with --overwrite) and must succeed.
- A full disk (RLIMIT_FSIZE, writes fail with EFBIG) at several sizes for the same commands: exit 2
  with one line, DST (holding a file of the user's) as it was.
- Bytes flipped at random positions of random files of a training checkpoint and of a model dir,
  and truncations: every one must be named by ``checksums.verify`` (training then falls back to
  the previous checkpoint; tests/test_train.py checks that path end to end).

Needs the ``hf`` extra (a random-weight HF model is built locally: no hub).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=6, help="SIGKILLs per command")
    ap.add_argument("--flips", type=int, default=40, help="damaged copies per kind of directory")
    ap.add_argument("--out", help="work directory (default: a temporary one, removed)")
    args = ap.parse_args()
    root = Path(args.out or tempfile.mkdtemp(prefix="jaxlm-faults-"))
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        rows += sweep_writers(root, args.kills)
        rows += sweep_damage(root, args.flips)
    finally:
        if not args.out:
            shutil.rmtree(root, ignore_errors=True)
    print("\n| fault | injected by | tried | outcome | data lost |\n|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(map(str, r)) + " |")


def jaxlm(*argv, **kw):
    return subprocess.run([sys.executable, "-m", "jaxlm.cli", *map(str, argv)], capture_output=True, text=True, **kw)


def same_output(dst: Path, ref: Path) -> bool:
    from jaxlm.io import checksums
    from jaxlm.io.model_dir import is_model_dir, read_model_dir

    if is_model_dir(ref):
        if checksums.verify(dst) is not True:
            return False
        a, b = read_model_dir(dst), read_model_dir(ref)
        import jax
        la, lb = jax.tree.leaves(a[1]), jax.tree.leaves(b[1])
        return a[0] == b[0] and len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y))
                                                           for x, y in zip(la, lb))
    from safetensors.numpy import load_file
    if (dst / "config.json").read_text() != (ref / "config.json").read_text():
        return False
    for f in ref.glob("*.safetensors"):
        x, y = load_file(dst / f.name), load_file(f)
        if x.keys() != y.keys() or not all(np.array_equal(x[k], y[k]) for k in y):
            return False
    return True


def sweep_writers(root: Path, kills: int) -> list:
    from jaxlm.testing import kill_while_writing, save_random_hf

    hf = save_random_hf("GPT2LMHeadModel", root / "hf")
    src = root / "model"
    assert jaxlm("convert", hf, src).returncode == 0
    commands = {"convert": lambda d: ["convert", hf, d], "export": lambda d: ["export", src, d],
                "quantize": lambda d: ["quantize", src, d], "prune": lambda d: ["prune", src, d, "--sparsity", "0.5"],
                "lowrank": lambda d: ["lowrank", src, d, "--rank", "4"]}
    rng = random.Random(0)
    rows = []
    for name, argv in commands.items():
        ref = root / f"ref-{name}"
        window = write_window(argv(ref), ref)
        dst = root / f"kill-{name}"
        landed = {"absent": 0, "complete": 0, "partial": 0, "finished": 0}
        for _ in range(kills):
            if dst.exists():
                shutil.rmtree(dst)
            outcome = kill_while_writing(argv(dst), dst, rng.uniform(0, window))
            if outcome == "finished":
                landed["finished"] += 1
            elif not dst.exists():
                landed["absent"] += 1
            else:
                landed["complete" if same_output(dst, ref) else "partial"] += 1
        rerun = jaxlm(*argv(dst), "--overwrite")
        ok = rerun.returncode == 0 and same_output(dst, ref)
        rows.append((f"kill -9 during `jaxlm {name}`", "SIGKILL at a uniform random moment of the write window",
                     kills, f"DST absent {landed['absent']}, complete {landed['complete']}, partial "
                     f"{landed['partial']} (finished first: {landed['finished']}); rerun "
                     f"{'succeeds' if ok else 'FAILS'}; write window {window:.2f} s", "none" if landed["partial"] == 0 and ok else "YES"))
        print(rows[-1], flush=True)
        tried = failed_clean = 0
        for limit in (16 << 10, 256 << 10, 4 << 20):
            mine = root / f"full-{name}-{limit}"
            mine.mkdir()
            (mine / "mine.txt").write_text("the user's file")
            r = subprocess.run([sys.executable, "-c", LIMITED, str(limit), *map(str, argv(mine)), "--overwrite"],
                               capture_output=True, text=True,
                               env={k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"})
            lines = r.stderr.strip().splitlines() or [""]
            tried += 1
            if r.returncode == 2 and "Traceback" not in r.stderr and lines[-1].startswith(
                    f"jaxlm {name}: error: could not write {mine}: File too large; nothing was written") and \
                    sorted(os.listdir(mine)) == ["mine.txt"] and (mine / "mine.txt").read_text() == "the user's file":
                failed_clean += 1
            elif r.returncode == 0 and same_output(mine, ref):
                failed_clean += 1  # it fitted: also fine
        rows.append((f"full disk during `jaxlm {name}`", "RLIMIT_FSIZE 16 KiB / 256 KiB / 4 MiB (EFBIG)", tried,
                     f"{failed_clean}/{tried}: exit 2, the error in one line, DST (holding a user file) as it was",
                     "none" if failed_clean == tried else "YES"))
        print(rows[-1], flush=True)
    return rows


def write_window(argv, dst: Path) -> float:
    """Run the command undisturbed; seconds from its first temporary file to DST's rename."""
    proc = subprocess.Popen([sys.executable, "-m", "jaxlm.cli", *map(str, argv)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    began = None
    while proc.poll() is None and not dst.exists():
        if began is None and any(p.name.startswith(f".{dst.name}.tmp-") for p in dst.parent.iterdir()):
            began = time.perf_counter()
        time.sleep(0.002)
    ended = time.perf_counter()
    assert proc.wait() == 0 and dst.exists()
    return max(0.01, ended - (began or ended))


# `jaxlm ARGV...` with RLIMIT_FSIZE set first (writes past it fail with EFBIG, as on a full disk).
LIMITED = """
import resource, runpy, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), resource.RLIM_INFINITY))
sys.argv = ["jaxlm", *sys.argv[2:]]
runpy.run_module("jaxlm.cli", run_name="__main__")
"""


def sweep_damage(root: Path, flips: int) -> list:
    from jaxlm.cli import DEFAULT_CONFIG
    from jaxlm.config import load_config
    from jaxlm.data import stdlib_dir
    from jaxlm.io import checksums
    from jaxlm.train import train

    text = root / "text"
    text.mkdir()
    for f in sorted(stdlib_dir().glob("*.py"))[:20]:
        shutil.copy(f, text / f.name)
    work = root / "run"
    train(load_config(DEFAULT_CONFIG, ["model.d_model=64", "model.n_layers=2", "model.n_heads=2", "data.seq_len=64",
                                       "data.batch_size=8", f"data.path={text}", f"data.data_dir={root / 'cache'}",
                                       "train.steps=2", "train.save_every=2", "train.eval_every=0",
                                       f"train.workdir={work}"]), log=lambda m: None)
    rng = random.Random(1)
    rows = []
    for kind, sealed in (("training checkpoint", work / "checkpoints" / "2"), ("jaxlm model dir", root / "model")):
        files = [p for p in sealed.rglob("*") if p.is_file() and p.name not in ("checksums.json",
                                                                                 "_CHECKPOINT_METADATA",
                                                                                 "commit_success.txt")]
        caught = {"flip": 0, "truncate": 0}
        for i in range(flips):
            how = "flip" if i % 4 else "truncate"
            copy = root / f"damaged-{i}"
            shutil.copytree(sealed, copy)
            f = copy / rng.choice(files).relative_to(sealed)
            data = bytearray(f.read_bytes())
            if how == "flip" and data:
                data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
            else:
                data = data[:rng.randrange(len(data))] if data else b"x"
            f.write_bytes(bytes(data))
            try:
                checksums.verify(copy)
            except checksums.DamagedError as e:
                caught[how] += e.file == str(f.relative_to(copy))
            shutil.rmtree(copy)
        n_flip, n_trunc = sum(1 for i in range(flips) if i % 4), sum(1 for i in range(flips) if not i % 4)
        rows.append((f"damaged {kind}", "one bit flipped at a random offset of a random file / file truncated",
                     flips, f"named: {caught['flip']}/{n_flip} flips, {caught['truncate']}/{n_trunc} truncations",
                     "none (detected, never loaded)" if caught["flip"] + caught["truncate"] == flips else "YES"))
        print(rows[-1], flush=True)
    return rows


if __name__ == "__main__":
    main()
