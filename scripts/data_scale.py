"""Data at scale, measured: peak memory of `jaxlm data prepare` on a synthetic 0.5 GB and 2 GB
corpus (GPT-2 BPE), its throughput next to `tokenizers`' encode_batch alone on the same text,
SIGKILL at random moments then rerun (shards byte-identical to a clean preparation), and how fast
the input pipeline delivers batches next to how fast training consumes them.

    python scripts/data_scale.py [--sizes 0.5,2] [--speed-mb 128] [--work DIR]

The corpus: JSONL documents of 1-16 KB, random slices of the standard library's text (seeded),
256 MB per file. Run with nothing else on the machine: the rates are wall-clock.
"""

import argparse
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FILE_MB = 256


def corpus(root: Path, gb: float, seed: int = 0) -> list[Path]:
    """ceil(gb * 1024 / 256) JSONL files of 256 MB (cached in root)."""
    from jaxlm.data import default_corpus_files

    root.mkdir(parents=True, exist_ok=True)
    n = max(1, round(gb * 1024 / FILE_MB))
    files = [root / f"part-{i:04d}.jsonl" for i in range(n)]
    if all(f.is_file() for f in files):
        return files
    text = "".join(f.read_text(errors="replace") for f in default_corpus_files()[:1500])
    rng = random.Random(seed)
    for f in files:
        if f.is_file():
            continue
        tmp = f.with_suffix(".tmp")
        with open(tmp, "w") as out:
            written = 0
            while written < FILE_MB << 20:
                a = rng.randrange(len(text) - 20000)
                line = json.dumps({"text": text[a: a + rng.randint(1024, 16384)]}) + "\n"
                out.write(line)
                written += len(line)
        os.replace(tmp, f)
    return files


def tokenizer_dir(work: Path) -> Path:
    from jaxlm.testing import gpt2_tokenizer_files

    d = work / "gpt2-tokenizer"
    d.mkdir(parents=True, exist_ok=True)
    for name, src in gpt2_tokenizer_files().items():
        shutil.copy(src, d / name)
    return d


def prepare_measured(files, tok, data_dir) -> dict:
    """`jaxlm data prepare` under /usr/bin/time -v: peak RSS and wall time."""
    argv = ["/usr/bin/time", "-v", sys.executable, "-m", "jaxlm.cli", "data", "prepare",
            f"data.path={','.join(map(str, files))}", f"data.tokenizer={tok}", f"data.data_dir={data_dir}"]
    t0 = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        sys.exit(proc.stderr)
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1)) * 1024
    size = sum(f.stat().st_size for f in files)
    return {"bytes": size, "peak_rss": rss, "wall": wall}


def speed(files, tok_dir, mb: int, out: Path) -> tuple[float, float]:
    """MB/s of text: encode_batch alone (4 MB batches, the same batches the preparation makes) and
    the preparation (reading, tokenizing, writing shards), alternated twice; the better of each."""
    from jaxlm.data import files_source, prepare_source
    from jaxlm.tokenizer import load_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    part = out / "speed.jsonl"
    with open(files[0], "rb") as f, open(part, "wb") as g:
        g.write(f.read(mb << 20).rsplit(b"\n", 1)[0] + b"\n")
    texts = [json.loads(x)["text"] for x in open(part)]
    nbytes = sum(len(t) for t in texts)  # characters, as the preparation batches them
    batches, cur, held = [], [], 0
    for t in texts:
        cur.append(t)
        held += len(t)
        if held >= 4 << 20:
            batches.append(cur)
            cur, held = [], 0
    batches.append(cur)
    tok = load_tokenizer(tok_dir)
    peer, ours = [], []
    for r in range(2):
        t0 = time.perf_counter()
        for b in batches:
            tok.backend.encode_batch(b, add_special_tokens=False)
        peer.append(nbytes / (time.perf_counter() - t0) / 1e6)
        shutil.rmtree(out / f"prep{r}", ignore_errors=True)
        t0 = time.perf_counter()
        prepare_source(files_source(str(part)), tok, out / f"prep{r}")
        ours.append(nbytes / (time.perf_counter() - t0) / 1e6)
        print(f"  repeat {r + 1}: encode_batch alone {peer[-1]:.2f} MB/s, jaxlm preparation {ours[-1]:.2f} MB/s",
              flush=True)
    return max(peer), max(ours)


def digests(d: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.glob("*.bin"))}


def crash(files, tok_dir, out: Path, mb: int = 48, chunk_mb: int = 8, seed: int = 0):
    """SIGKILL at 3 random moments of a preparation, each followed by the next attempt; the last
    runs to the end. Returns (clean digests == final digests, units complete at each kill)."""
    out.mkdir(parents=True, exist_ok=True)
    part = out / "crash.jsonl"
    with open(files[0], "rb") as f, open(part, "wb") as g:
        g.write(f.read(mb << 20).rsplit(b"\n", 1)[0] + b"\n")
    code = ("import sys; from jaxlm.data import files_source, prepare_source; from jaxlm.tokenizer import load_tokenizer; "
            f"prepare_source(files_source(sys.argv[1]), load_tokenizer(sys.argv[2]), sys.argv[3], chunk_bytes={chunk_mb << 20})")
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code, str(part), str(tok_dir), str(out / "clean")], check=True)
    total = time.perf_counter() - t0
    rng = random.Random(seed)
    kept = []
    for _ in range(3):
        proc = subprocess.Popen([sys.executable, "-c", code, str(part), str(tok_dir), str(out / "killed")])
        time.sleep(rng.uniform(0.5, total / 3))  # each attempt can finish about a third of the work
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kept.append(len(list((out / "killed").glob("unit-*.json"))))
    subprocess.run([sys.executable, "-c", code, str(part), str(tok_dir), str(out / "killed")], check=True)
    return digests(out / "clean") == digests(out / "killed"), kept, len(digests(out / "clean")), total


def loader_vs_training(tok_dir, data_files, work: Path):
    """(name, loader tokens/s, training tokens/s) for the quickstart and gpt2_small.yaml's data shape."""
    from jaxlm.cli import DEFAULT_CONFIG
    from jaxlm.config import load_config
    from jaxlm.data import loader, packed_rows
    from jaxlm.train import Hook, data_tokenizer, train

    out = []
    for name, config, extra, train_extra in [
        ("quickstart", DEFAULT_CONFIG, [], []),
        ("gpt2_small.yaml", "configs/gpt2_small.yaml", [f"data.tokenizer={tok_dir}", "data.tfds_name=",
                                                        f"data.path={data_files}"],
         ["data.batch_size=4", "train.dtype=float32"]),
    ]:
        cfg = load_config(config, [*extra, f"data.data_dir={work / 'cache'}"])
        tok = data_tokenizer(cfg.data)
        rows = packed_rows(cfg.data, "train", tok)
        it = loader(rows, batch_size=cfg.data.batch_size, seed=0)
        next(it)
        n = 50 if cfg.data.batch_size > 64 else 500
        t0 = time.perf_counter()
        for _ in range(n):
            next(it)
        load_rate = n * cfg.data.batch_size * cfg.data.seq_len / (time.perf_counter() - t0)
        stamps = []
        steps = 12 if name == "quickstart" else 3
        tcfg = load_config(config, [*extra, *train_extra, f"data.data_dir={work / 'cache'}", f"train.steps={steps}",
                                    "train.eval_every=0", f"train.save_every={steps}",
                                    f"train.workdir={work / ('run-' + name)}"])
        shutil.rmtree(work / ("run-" + name), ignore_errors=True)
        train(tcfg, log=lambda m: None, hooks=[Hook(lambda info: stamps.append(time.perf_counter()), every=1)])
        per_step = (stamps[-1] - stamps[1]) / (len(stamps) - 2)  # after the compiled first step
        train_rate = tcfg.data.batch_size * tcfg.data.seq_len / per_step
        out.append((name, cfg.data.batch_size, load_rate, tcfg.data.batch_size, train_rate))
        print(f"  {name}: loader {load_rate:,.0f} tokens/s (batches of {cfg.data.batch_size}x{cfg.data.seq_len}); "
              f"training {train_rate:,.0f} tokens/s (batch {tcfg.data.batch_size}); ratio {load_rate / train_rate:.0f}x",
              flush=True)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="0.5,2", help="corpus sizes in GB for the memory measurement")
    ap.add_argument("--speed-mb", type=int, default=128)
    ap.add_argument("--work", default=None, help="work directory (default: a temporary one, removed)")
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: memory,speed,crash,loader")
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="jaxlm-data-scale-"))
    skip = set(args.skip.split(","))
    from benchlib import load_line

    print(load_line())
    tok = tokenizer_dir(work)
    sizes = [float(s) for s in args.sizes.split(",")]
    files = corpus(work / "corpus", max(sizes))
    if "memory" not in skip:
        peaks = []
        for gb in sizes:
            part = files[: max(1, round(gb * 1024 / FILE_MB))]
            shutil.rmtree(work / f"cache-{gb}", ignore_errors=True)
            r = prepare_measured(part, tok, work / f"cache-{gb}")
            peaks.append(r["peak_rss"])
            print(f"memory: {r['bytes'] / 2**30:.2f} GiB corpus -> peak RSS {r['peak_rss'] / 2**20:.0f} MiB, "
                  f"{r['wall']:.0f} s ({r['bytes'] / r['wall'] / 1e6:.2f} MB/s)", flush=True)
        if len(peaks) > 1:
            print(f"memory: peak grows {100 * (peaks[-1] / peaks[0] - 1):+.1f}% from {sizes[0]} to {sizes[-1]} GB")
    if "speed" not in skip:
        print(f"speed on {args.speed_mb} MB of the corpus (GPT-2 BPE, {os.cpu_count()} cores):", flush=True)
        peer, ours = speed(files, tok, args.speed_mb, work / "speed")
        print(f"speed: jaxlm preparation {ours:.2f} MB/s = {ours / peer:.2f}x encode_batch alone ({peer:.2f} MB/s)")
    if "crash" not in skip:
        same, kept, units, total = crash(files, tok, work / "crash")
        print(f"crash: 3 SIGKILLs at random moments of a {total:.0f} s preparation ({units // 2} units; complete at "
              f"each kill: {kept}), then a rerun: shards {'byte-identical' if same else 'DIFFERENT'} (sha256)")
    if "loader" not in skip:
        print("loader vs training:", flush=True)
        loader_vs_training(tok, files[0], work)
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
