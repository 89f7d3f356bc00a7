"""Greedy generation speed: jaxlm beside Hugging Face transformers (PyTorch) on the same weights.

GPT-2 small shape (124M, float32, random weights), prompt 32 tokens, 128 new tokens, greedy, no
early EOS, batch 1 and 8. jaxlm and the peer alternate within each repeat (so a change in the
machine's load hits both); each cell is the median tokens/s with the (min-max) spread. The
roofline is batch x the weight-read bandwidth measured here (a jitted matvec chain) / the bytes
of weights one decode step reads. Checks that both produce the same tokens; exits non-zero if not.

    python scripts/bench_generate.py [--batch 1 8] [--new 128] [--repeats 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

import numpy as np


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--size", default="base", choices=["tiny", "base"])
    p.add_argument("--init-range", type=float, default=0.1,
                   help="weight std: peaked logits (no near-ties) yet numerically tame over 12 layers")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="jaxlm compute dtype")
    p.add_argument("--no-hf", action="store_true", help="jaxlm only (e.g. on an accelerator)")
    args = p.parse_args(argv)

    import jax
    import torch
    import transformers

    import jaxlm
    from jaxlm.testing import save_random_hf

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as d:
        save_random_hf("GPT2LMHeadModel", d, size=args.size, init_range=args.init_range)
        lm = jaxlm.load(d, dtype=args.dtype)
        lm = jaxlm.LM(lm.config.replace(eos_token_id=None), lm.params, lm.tokenizer)  # no early stop
        hf = None if args.no_hf else transformers.GPT2LMHeadModel.from_pretrained(d).eval()
    if hf is not None:
        hf.generation_config.eos_token_id = None
        hf.generation_config.pad_token_id = 0

    from benchlib import load_line, rate_cell, spread, weight_read_bandwidth

    print(load_line())
    bandwidth = weight_read_bandwidth()
    weight_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(lm.params))
    from jaxlm import kernels

    used = ("jaxlm.kernels (CPU, weights read once per step)" if kernels.available()
            else "XLA's dot (jaxlm.kernels not built here)")
    print(f"jaxlm decode matmuls: {used}")
    print(f"weight-read bandwidth (matvec chain): {bandwidth / 1e9:.1f} GB/s; one decode step reads "
          f"{weight_bytes / 1e6:.0f} MB of weights: roofline {bandwidth / weight_bytes:.1f} tokens/s per row")
    print(f"GPT-2 {args.size} ({sum(x.size for x in jax.tree.leaves(lm.params)) / 1e6:.0f}M params), "
          f"prompt {args.prompt}, {args.new} new tokens, greedy; jax {jax.__version__} on "
          f"{jax.devices()[0].platform} ({args.dtype}), torch {torch.__version__} with {args.threads} threads")
    rows = []
    ok = True
    for b in args.batch:
        ids = np.random.RandomState(b).randint(0, lm.config.vocab_size, (b, args.prompt))
        t0 = time.perf_counter()
        ours = lm.generate(ids, max_new_tokens=args.new)
        compile_s = time.perf_counter() - t0
        jt, ht = [], []
        ref = None
        for _ in range(args.repeats):  # alternate: jaxlm, then the peer, in each repeat
            t0 = time.perf_counter()
            ours = lm.generate(ids, max_new_tokens=args.new)
            jt.append(time.perf_counter() - t0)
            if hf is not None:
                with torch.inference_mode():
                    t0 = time.perf_counter()
                    ref = hf.generate(torch.tensor(ids), attention_mask=torch.ones(b, args.prompt, dtype=torch.long),
                                      max_new_tokens=args.new, do_sample=False).numpy()
                    ht.append(time.perf_counter() - t0)
        agree = "-"
        if ref is not None:
            same = np.array_equal(ours, ref)
            agree = "yes" if same else f"NO ({(ours != ref).sum()} tokens differ)"
            ok &= same
        jax_tps = b * args.new / spread(jt)[0]
        hf_tps = b * args.new / spread(ht)[0] if ht else float("nan")
        roof = b * bandwidth / weight_bytes
        cells = (rate_cell(b * args.new, jt), rate_cell(b * args.new, ht) if ht else "-")
        rows.append((b, *cells, jax_tps / hf_tps, roof, jax_tps / roof, compile_s, agree))

    print(f"tokens/s: median (min-max) of {args.repeats} alternating repeats")
    print(f"{'batch':>5} {'jaxlm tok/s':>20} {'HF torch tok/s':>20} {'ratio':>6} {'roofline':>9} {'jaxlm/roof':>10} "
          f"{'first call s':>12} {'same tokens':>12}")
    for b, j, h, r, roof, frac, c, a in rows:
        print(f"{b:>5} {j:>20} {h:>20} {r:>6.2f} {roof:>9.1f} {frac:>10.0%} {c:>12.1f} {a:>12}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
