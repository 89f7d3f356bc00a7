"""Speculative decoding against plain greedy decoding of the same target, side by side in one run.

    python scripts/bench_speculative.py              # ~25 min the first time (trains both models), then ~3 min
    python scripts/bench_speculative.py --train-only # just the two trainings (cached in runs/speculative)

- target: configs/teacher.yaml (8 layers, d=192, byte-level, the stdlib corpus) with a 192-token
  context (model.max_len=192, data.seq_len=192, data.batch_size=24: the same bytes per step), trained
  by `jaxlm train` into runs/speculative/target;
- draft: a 2-layer d=128 student distilled from it (train.objective=distill, 300 steps) into
  runs/speculative/draft;
- prompts: 64 bytes from the middle of each of 10 held-out files (from a line start; the validation
  split of the training corpus); batch 1, 128 new tokens, greedy, then sampled (T=0.8, top-k 50,
  top-p 0.95);
- plain `lm.generate` and `lm.generate(draft=..., speculate_k=K)` alternate within each repeat;
  each cell is the median (min-max) of the repeats over all prompts' tokens; the speculative
  outputs are checked token for token against the plain ones;
- prompt lookup (`draft="prompt_lookup"`) on a code-editing prompt (a function followed by the
  start of its edited copy) and on the held-out prompts;
- the server's engine (`jaxlm.serve.Engine`, what `jaxlm serve` runs; in process, no HTTP): the 10
  prompts submitted at once to 4 slots, greedy, 128 new tokens each, plain against `--draft` and
  prompt lookup (texts checked against the plain engine's). `--serve-only` runs just this part.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import numpy as np  # noqa: E402

import jaxlm  # noqa: E402
from benchlib import load_line, rate_cell  # noqa: E402
from jaxlm.config import load_config  # noqa: E402
from jaxlm.data import data_sources  # noqa: E402
from jaxlm.data.sources import validation_files  # noqa: E402
from jaxlm.io import is_workdir  # noqa: E402
from jaxlm.train import train  # noqa: E402

RUNS = ROOT / "runs" / "speculative"
TARGET = ["model.max_len=192", "data.seq_len=192", "data.batch_size=24"]
DRAFT = [*TARGET, "model.d_model=128", "model.n_layers=2", "model.n_heads=4", "train.steps=300",
         "train.objective=distill", f"distill.teacher={RUNS / 'target'}", "distill.temperature=1", "distill.alpha=0.9"]
NEW = 128
EDIT = '''def area(width, height):
    return width * height


# The same function, renamed.
def rectangle_area(width, height):
'''


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def trained(name, overrides):
    workdir = RUNS / name
    cfg = load_config(ROOT / "configs" / "teacher.yaml", [f"train.workdir={workdir}", *overrides])
    if not (is_workdir(workdir) and (workdir / "checkpoints" / str(cfg.train.steps)).is_dir()):
        log(f"training the {name} ({' '.join(overrides)})")
        t0 = time.perf_counter()
        train(cfg, log=lambda m: log(f"  {m}") if "val_loss" in m or m.startswith("done") else None)
        log(f"  {name} trained in {time.perf_counter() - t0:.0f}s")
    return workdir


def held_out_prompts(n=10, size=64):
    """`size` bytes from the middle of each of the first n validation files of the target's corpus."""
    (source, _), = data_sources(load_config(ROOT / "configs" / "teacher.yaml", TARGET).data)
    files = sorted(validation_files(source))
    prompts = []
    for f in files:
        text = Path(f).read_text(errors="replace")
        if len(text) < 2 * size:
            continue
        at = text.find("\n", len(text) // 2) + 1  # from the middle: code rather than headers
        prompts.append(text[at:at + size])
        if len(prompts) == n:
            break
    return prompts


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train-only", action="store_true")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ks", default="1,2,3,4,6,8")
    ap.add_argument("--serve-only", action="store_true", help="only the server engine's comparison")
    args = ap.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    target_dir = trained("target", TARGET)
    draft_dir = trained("draft", DRAFT)
    if args.train_only:
        return
    print(load_line())
    lm, draft = jaxlm.load(target_dir), jaxlm.load(draft_dir)
    print(f"target: {lm}\ndraft:  {draft}")
    prompts = held_out_prompts()
    rows = [lm.tokenizer.encode(p, add_special_tokens=False) for p in prompts]
    ks = [int(k) for k in args.ks.split(",")]
    if args.serve_only:
        return serve_leg(lm, draft, rows, args.repeats)

    def plain(r):
        return lm.generate([r], max_new_tokens=NEW)

    def spec(r, d, k):
        out = lm.generate([r], max_new_tokens=NEW, draft=d, speculate_k=k)
        return out, lm.last_speculation

    # Warm up every program (one compile per prompt bucket and K), and check the tokens.
    want = {i: plain(r) for i, r in enumerate(rows)}
    modes = [("draft", k) for k in ks] + [("prompt_lookup", k) for k in (2, 4, 8)]
    for mode, k in modes:
        for i, r in enumerate(rows):
            got, _ = spec(r, draft if mode == "draft" else "prompt_lookup", k)
            assert (got == want[i]).all(), f"{mode} K={k}: prompt {i} differs from plain greedy"
    tokens = sum(int(np.sum(w[0, len(r):] != lm.config.pad_token_id)) for w, r in zip(want.values(), rows))

    times = {m: [] for m in [("plain", 0), *modes]}
    stats = {m: [] for m in modes}
    for _ in range(args.repeats):
        for m in times:  # alternate: every mode once per repeat, over all prompts
            total = 0.0
            for r in rows:
                if m[0] == "plain":
                    _, t = timed(lambda: plain(r))
                else:
                    (_, s), t = timed(lambda: spec(r, draft if m[0] == "draft" else "prompt_lookup", m[1]))
                    stats[m].append(s)
                total += t
            times[m].append(total)

    def med(xs):
        return sorted(xs)[len(xs) // 2]

    base = med(times[("plain", 0)])
    print(f"\nbatch 1, greedy, {len(rows)} held-out prompts x {NEW} new tokens ({tokens} tokens), "
          f"median (min-max) of {args.repeats} alternating repeats; outputs identical to plain greedy")
    print(f"{'proposer':<16}{'K':>3}  {'tokens/s':<22}{'speed-up':>9}{'accepted':>10}{'tok/pass':>10}")
    print(f"{'plain greedy':<16}{'-':>3}  {rate_cell(tokens, times[('plain', 0)]):<22}{1.0:>8.2f}x{'-':>10}{1.0:>10.2f}")
    for m in modes:
        acc = sum(s.accepted for s in stats[m]) / max(sum(s.proposed for s in stats[m]), 1)
        per = sum(s.new_tokens for s in stats[m]) / max(sum(s.target_passes for s in stats[m]), 1)
        print(f"{m[0]:<16}{m[1]:>3}  {rate_cell(tokens, times[m]):<22}{base / med(times[m]):>8.2f}x"
              f"{100 * acc:>9.0f}%{per:>10.2f}")

    white = sum(lm.tokenizer.decode(list(w[0, len(r):])).isspace() for w, r in zip(want.values(), rows))
    print(f"(this 3.6M-parameter target's greedy continuations fall into loops ({white} of {len(rows)} are whitespace "
          "only, others repeat a phrase), which flatters every proposer; the sampled rows below are ordinary text)")

    # Sampling (T=0.8, top-k 50, top-p 0.95): outputs differ from plain sampling's (other random
    # draws, the same distribution), so each cell is tokens made / time over the same prompts.
    sampled = dict(temperature=0.8, top_k=50, top_p=0.95)
    smodes = [("plain", 0)] + [("draft", k) for k in (2, 3, 4)]

    def run_sampled(m, seed):
        made = 0
        t0 = time.perf_counter()
        for r in rows:
            kw = {} if m[0] == "plain" else dict(draft=draft, speculate_k=m[1])
            out = lm.generate([r], max_new_tokens=NEW, seed=seed, **sampled, **kw)
            made += int(np.sum(out[0, len(r):] != lm.config.pad_token_id))
            if m[0] != "plain":
                sstats[m].append(lm.last_speculation)
        return made, time.perf_counter() - t0

    sstats = {m: [] for m in smodes}
    for m in smodes:
        run_sampled(m, 99)  # compile
    sstats = {m: [] for m in smodes}
    srates = {m: [] for m in smodes}
    for rep in range(args.repeats):
        for m in smodes:
            made, t = run_sampled(m, rep)
            srates[m].append(made / t)
    print(f"\nbatch 1, sampled (T=0.8, top-k 50, top-p 0.95), the same prompts, median (min-max) tokens/s of "
          f"{args.repeats} alternating repeats (other seeds each repeat):")
    base_s = med(srates[("plain", 0)])
    for m in smodes:
        acc = "-" if m[0] == "plain" else f"{100 * sum(s.accepted for s in sstats[m]) / sum(s.proposed for s in sstats[m]):.0f}%"
        cell = f"{med(srates[m]):.1f} ({min(srates[m]):.1f}-{max(srates[m]):.1f})"
        print(f"{m[0] if m[0] == 'plain' else 'draft':<16}{m[1] or '-':>3}  {cell:<22}{med(srates[m]) / base_s:>8.2f}x{acc:>10}")
    print("sample:", repr(lm.tokenizer.decode(list(lm.generate([rows[3]], max_new_tokens=NEW, seed=0, **sampled)[0, len(rows[3]):]))))

    # Prompt lookup on a code edit: the continuation copies most of the prompt.
    edit = [lm.tokenizer.encode(EDIT, add_special_tokens=False)]
    n_new = min(NEW, lm.config.context - len(edit[0]))
    ref = lm.generate(edit, max_new_tokens=n_new)
    for k in (2, 4, 8):
        assert (lm.generate(edit, max_new_tokens=n_new, draft="prompt_lookup", speculate_k=k) == ref).all()
    t_plain, t_look = {}, {}
    for _ in range(args.repeats):
        for k in (2, 4, 8):
            t_plain.setdefault(k, []).append(timed(lambda: lm.generate(edit, max_new_tokens=n_new))[1])
            t_look.setdefault(k, []).append(timed(lambda: lm.generate(edit, max_new_tokens=n_new, draft="prompt_lookup",
                                                                     speculate_k=k))[1])
    print(f"\ncode-editing prompt ({len(edit[0])} bytes), {n_new} new tokens, prompt lookup vs plain greedy:")
    print(repr(lm.tokenizer.decode(list(ref[0, len(edit[0]):]))[:120]))
    for k in (2, 4, 8):
        lm.generate(edit, max_new_tokens=n_new, draft="prompt_lookup", speculate_k=k)
        print(f"  K={k}: plain {rate_cell(n_new, t_plain[k])} tok/s, lookup {rate_cell(n_new, t_look[k])} tok/s, "
              f"{med(t_plain[k]) / med(t_look[k]):.2f}x; {lm.last_speculation}")
    serve_leg(lm, draft, rows, args.repeats)


def serve_leg(lm, draft, rows, repeats, slots=4):
    """The server's engine, plain and speculative, alternating within each repeat: every prompt
    submitted at once to ``slots`` slots, greedy, NEW tokens each."""
    from jaxlm.serve import Engine

    modes = [("plain", None, None), ("draft", draft, 4), ("draft", draft, 8), ("prompt_lookup", "prompt_lookup", 8)]
    engines = {}
    for name, d, k in modes:
        engines[name, k] = Engine(lm, max_batch=slots, draft=d, speculate_k=k)
        engines[name, k].warmup()
        engines[name, k].start()

    def run(engine):
        t0 = time.perf_counter()
        reqs = [engine.submit(r, max_tokens=NEW, temperature=0.0) for r in rows]
        texts = [tuple(req.result()[0].token_ids) for req in reqs]
        return texts, time.perf_counter() - t0

    want, _ = run(engines["plain", None])
    for m, e in engines.items():
        got, _ = run(e)  # warm: every prompt bucket
        assert got == want, f"{m}: the server's greedy tokens differ from the plain server's"
        e.proposed = e.accepted = 0
    tokens = sum(map(len, want))
    times = {m: [] for m in engines}
    for _ in range(repeats):
        for m, e in engines.items():
            times[m].append(run(e)[1])
    base = sorted(times["plain", None])[len(times["plain", None]) // 2]
    print(f"\nserver engine (jaxlm serve's), {len(rows)} held-out prompts submitted at once to {slots} slots, greedy, "
          f"{NEW} new tokens each ({tokens} tokens), median (min-max) of {repeats} alternating repeats; "
          "tokens identical to the plain server's")
    print(f"{'proposer':<16}{'K':>3}  {'tokens/s':<22}{'speed-up':>9}{'accepted':>10}")
    for (name, k), e in engines.items():
        med = sorted(times[name, k])[len(times[name, k]) // 2]
        acc = "-" if e.acceptance is None else f"{100 * e.acceptance:.0f}%"
        print(f"{name:<16}{k or '-':>3}  {rate_cell(tokens, times[name, k]):<22}{base / med:>8.2f}x{acc:>10}")
        e.stop()
    print(load_line())


if __name__ == "__main__":
    main()
