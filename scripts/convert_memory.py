"""Peak memory of `jaxlm convert` and `jaxlm export` against the model's size: random Llama-shaped
float32 checkpoints of about 0.5 GB (1 layer) and 2 GB (10 layers), the same widths, in 8
safetensors shards each. Measured with /usr/bin/time -v (maximum resident set size); the export
is checked tensor by tensor against the original.

    python scripts/convert_memory.py [--layers 1 10] [--out /tmp/jaxlm-memory]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np


def make_checkpoint(dst: Path, n_layers: int, shards: int = 8):
    """A Llama-shaped HF dir (d=2048, 16 heads over 4 kv heads, MLP 5632, vocab 16384, untied head)
    with random float32 weights, written shard by shard (one shard's tensors in memory)."""
    from safetensors.numpy import save_file

    from jaxlm.config import ModelConfig
    from jaxlm.io.hf import llama

    config = ModelConfig.preset("llama-tiny", vocab_size=16384, max_len=4096, d_model=2048, n_layers=n_layers,
                                n_heads=16, n_kv_heads=4, d_ff=5632)
    hf = llama.config_to_hf(config)
    tensors = [(("" if r.head else llama.PREFIX) + r.name.format(i), r.shape)
               for r in llama.rules(config) if r.to_hf is not None for i in (range(n_layers) if r.layered else [None])]
    total = sum(int(np.prod(s)) * 4 for _, s in tensors)
    per, groups, size = total / shards, [[]], 0
    for name, shape in tensors:
        if size >= per * len(groups) and len(groups) < shards:
            groups.append([])
        groups[-1].append((name, shape))
        size += int(np.prod(shape)) * 4
    dst.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    for fname, group in zip(names, groups):
        save_file({n: (0.02 * rng.standard_normal(s, np.float32)) for n, s in group}, str(dst / fname),
                  metadata={"format": "pt"})
    (dst / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": {n: f for f, g in zip(names, groups) for n, _ in g}}))
    (dst / "config.json").write_text(json.dumps({**hf, "dtype": "float32"}))
    return total


def peak_mib(argv) -> float:
    proc = subprocess.run(["/usr/bin/time", "-v", sys.executable, "-m", "jaxlm.cli", *map(str, argv)],
                          capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(proc.stderr[-2000:])
    return int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1)) / 1024


def same_tensors(a: Path, b: Path) -> bool:
    from safetensors import safe_open

    def where(d):
        return {k: f for f in sorted(d.glob("*.safetensors")) for k in safe_open(str(f), framework="np").keys()}

    wa, wb = where(a), where(b)
    if set(wa) != set(wb):
        return False
    for name in wa:  # one tensor at a time
        with safe_open(str(wa[name]), framework="np") as fa, safe_open(str(wb[name]), framework="np") as fb:
            if fa.get_tensor(name).tobytes() != fb.get_tensor(name).tobytes():
                return False
    return True


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, nargs="+", default=[1, 10])
    p.add_argument("--out", default="/tmp/jaxlm-memory")
    args = p.parse_args(argv)
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    rows = []
    for n in args.layers:
        d = out / f"{n}layers"
        size = make_checkpoint(d / "hf", n)
        convert = peak_mib(["convert", d / "hf", d / "jax"])
        export = peak_mib(["export", d / "jax", d / "out", "--max-shard-size", str(size // 8 + 1)])
        rows.append((n, size / 2**30, convert, export, same_tensors(d / "hf", d / "out")))
        shutil.rmtree(d)
    print(f"{'layers':>6} {'checkpoint GiB':>15} {'convert peak MiB':>17} {'export peak MiB':>16} {'same tensors':>13}")
    for n, gib, c, e, same in rows:
        print(f"{n:>6} {gib:>15.2f} {c:>17.0f} {e:>16.0f} {'yes' if same else 'NO':>13}")
    if len(rows) > 1:
        (_, g0, c0, e0, _), (_, g1, c1, e1, _) = rows[0], rows[-1]
        print(f"model x{g1 / g0:.1f}: convert peak {100 * (c1 / c0 - 1):+.0f}%, export peak {100 * (e1 / e0 - 1):+.0f}%")
    return 0 if all(r[-1] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
