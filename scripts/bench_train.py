"""Training speed: jaxlm's train step beside Hugging Face transformers (PyTorch eager, AdamW).

Both start from the same weights and see the same batches (causal LM, float32, dropout off, global
norm clipping at 1.0); the first step's losses are compared as a sanity check. The two alternate
step by step (so a change in the machine's load hits both); each cell is the median tokens/s with
the (min-max) spread, then the ratio of medians and jaxlm's compile time.

    python scripts/bench_train.py [--steps 10] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time

import numpy as np

SHAPES = {
    # name: (HF GPT2Config overrides, batch, seq_len)
    "gpt2-small 4x64": (dict(), 4, 64),
    "gpt 6L d384 8x256": (dict(n_embd=384, n_layer=6, n_head=6, n_positions=256), 8, 256),
}


def hf_stepper(model, threads):
    """step(batch) -> (seconds, loss) of one PyTorch AdamW step."""
    import torch

    torch.set_num_threads(threads)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    model.train()

    def step(b):
        x = torch.tensor(b)
        t0 = time.perf_counter()
        logits = model(x[:, :-1]).logits  # the same T predictions as jaxlm's objective
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return time.perf_counter() - t0, float(loss.detach())

    return step


def jaxlm_stepper(path, scan):
    """step(batch) -> (seconds, loss) of one jaxlm train step (jitted; the first call compiles)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxlm.config import OptimConfig
    from jaxlm.io.hf import hf_to_params
    from jaxlm.optim import make_optimizer, schedule
    from jaxlm.objectives.clm import CLM
    from jaxlm.train import StepSpec, make_train_step
    from jaxlm.transformer import abstract_model, params_for

    cfg, params = hf_to_params(path)
    cfg = cfg.replace(scan_layers=scan, dropout=0.0, attention_dropout=0.0)
    params = params_for(cfg, jax.tree.map(jnp.asarray, params))
    opt = OptimConfig(lr=1e-4, warmup_steps=0, min_lr_ratio=1.0)
    tx = make_optimizer(opt, 1000)
    train_step = make_train_step(nnx.graphdef(abstract_model(cfg)), tx, StepSpec(CLM()), schedule(opt, 1000),
                                 dropout=False)
    state = {"params": params, "opt_state": tx.init(params), "step": jnp.int32(0)}

    def step(b):
        nonlocal state
        t0 = time.perf_counter()
        state, m = train_step(state, jnp.asarray(b))
        loss = float(m["loss"])
        return time.perf_counter() - t0, loss

    return step


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--shape", nargs="*", choices=list(SHAPES), default=list(SHAPES))
    p.add_argument("--scan", action="store_true",
                   help="jaxlm with scan over layers (default: unrolled, as configs/quickstart.yaml trains)")
    args = p.parse_args(argv)

    import jax
    import torch
    import transformers

    from jaxlm.testing import save_random_hf

    from benchlib import load_line, rate_cell

    print(load_line())
    print(f"train step, float32, AdamW + clipping; jax {jax.__version__} ({jax.devices()[0].platform}, "
          f"{'scan' if args.scan else 'unrolled'} layers), torch {torch.__version__} ({args.threads} threads)")
    rows = []
    for name in args.shape:
        overrides, b, t = SHAPES[name]
        rng = np.random.RandomState(0)
        with tempfile.TemporaryDirectory() as d:
            save_random_hf("GPT2LMHeadModel", d, size="base", init_range=0.02, resid_pdrop=0.0,
                           embd_pdrop=0.0, attn_pdrop=0.0, **overrides)
            batches = [rng.randint(0, 50257, (b, t + 1)) for _ in range(args.steps + 1)]
            ours = jaxlm_stepper(d, args.scan)
            peer = hf_stepper(transformers.GPT2LMHeadModel.from_pretrained(d), args.threads)
            compile_s, jfirst = ours(batches[0])
            hfirst = peer(batches[0])[1]  # warm-up step of the peer, not timed either
            jt, ht = [], []
            for batch in batches[1:]:  # alternate, step by step
                jt.append(ours(batch)[0])
                ht.append(peer(batch)[0])
        jtps = b * t / statistics.median(jt)
        htps = b * t / statistics.median(ht)
        cells = (rate_cell(b * t, jt), rate_cell(b * t, ht))
        rows.append((name, *cells, jtps / htps, compile_s, abs(jfirst - hfirst)))
    print(f"tokens/s: median (min-max) of {args.steps} alternating steps")
    print(f"{'shape':<20} {'jaxlm tok/s':>20} {'HF torch tok/s':>20} {'ratio':>6} {'compile s':>10} "
          f"{'|loss diff| step 1':>19}")
    for name, j, h, r, c, dl in rows:
        print(f"{name:<20} {j:>20} {h:>20} {r:>6.2f} {c:>10.1f} {dl:>19.2e}")
    return 0 if all(r[-1] < 1e-3 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
