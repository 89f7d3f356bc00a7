"""A trained BPE tokenizer against the byte tokenizer, on the quickstart (one run, CPU):

1. `jaxlm tokenizer train` (byte-level BPE, --vocab-size 4096) on the training split of the
   quickstart corpus (the standard library's .py files; the validation files are held out);
2. every file of the corpus round-trips (decode(encode(text)) == text);
3. the quickstart model (configs/quickstart.yaml) trained for the same number of steps with each
   tokenizer; the final validation loss is compared in bits per byte of text:
   loss (nats/token) x validation tokens / validation bytes / ln 2.

    python scripts/tokenizer_compare.py [--steps 300] [--vocab-size 4096] [--out DIR]

Same steps, batch and rows of 128 tokens on both sides, so the BPE run sees more text per step.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--out", default=None, help="work directory (default: a temporary one)")
    args = ap.parse_args()
    root = Path(args.out or tempfile.mkdtemp(prefix="jaxlm-tokcmp-"))

    from jaxlm.cli import DEFAULT_CONFIG, main as cli
    from jaxlm.config import load_config
    from jaxlm.data import default_corpus_files, in_validation, packed_rows, prepared
    from jaxlm.tokenizer import ByteTokenizer, load_tokenizer
    from jaxlm.train import train

    files = default_corpus_files()
    base = os.path.commonpath([str(f.parent) for f in files])
    held_out = {f for f in files if in_validation(os.path.relpath(f, base), 0.05)}
    train_files = [f for f in files if f not in held_out]
    tok_dir = root / "bpe"
    t0 = time.perf_counter()
    if not tok_dir.exists():
        assert cli(["tokenizer", "train", *map(str, train_files), "--vocab-size", str(args.vocab_size),
                    "--out", str(tok_dir)]) == 0
    print(f"tokenizer: {len(train_files)} training files ({len(held_out)} held out), "
          f"{time.perf_counter() - t0:.1f}s", flush=True)
    bpe = load_tokenizer(tok_dir)
    bad = sum(bpe.decode(bpe.encode(t := f.read_text(errors="replace"), add_special_tokens=False),
                         skip_special_tokens=False) != t for f in files)
    print(f"round trip: {len(files) - bad}/{len(files)} files identical", flush=True)

    results = {}
    for name, tok, extra in (("byte", ByteTokenizer(), []),
                             (f"bpe-{args.vocab_size}", bpe, [f"data.tokenizer={tok_dir}",
                                                             f"model.vocab_size={bpe.vocab_size}"])):
        w = root / f"run-{name}"
        argv = [*extra, f"train.steps={args.steps}", f"train.eval_every={args.steps}", f"train.save_every={args.steps}",
                f"train.workdir={w}", f"data.data_dir={root / 'data'}"]
        cfg = load_config(DEFAULT_CONFIG, argv)
        t0 = time.perf_counter()
        last = train(cfg, log=lambda m: None)
        took = time.perf_counter() - t0
        val = packed_rows(cfg.data, "validation", tok)
        ((_, _, _, index),) = prepared(cfg.data, ByteTokenizer())  # byte tokens = UTF-8 bytes + one EOS each
        nbytes = index["validation"]["tokens"] - index["validation"]["docs"]
        tokens_per_byte = len(val.stream) / nbytes
        first = json.loads(open(w / "metrics.jsonl").readline())["val_loss"]
        bpb = last["val_loss"] * tokens_per_byte / math.log(2)
        results[name] = bpb
        print(f"{name:10s} vocab {tok.vocab_size:5d}  {tokens_per_byte:.3f} tokens/byte  val_loss {first:.3f} -> "
              f"{last['val_loss']:.3f} nats/token = {bpb:.3f} bits/byte  ({args.steps} steps, {took:.0f}s)",
              flush=True)
    b, p = results["byte"], results[f"bpe-{args.vocab_size}"]
    print(f"bits per byte: byte {b:.3f}, bpe {p:.3f} ({'lower' if p < b else 'NOT lower'} by {b - p:.3f})")
    sys.exit(0 if p < b and bad == 0 else 1)


if __name__ == "__main__":
    main()
