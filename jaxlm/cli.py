"""The ``jaxlm`` command. Bad input exits non-zero with one line on stderr, never a traceback."""

from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def cmd_convert(args) -> int:
    from jaxlm.io.hf import convert
    from jaxlm.io.hub import local_dir

    t0 = time.perf_counter()
    convert(local_dir(args.src), args.dst, overwrite=args.overwrite, dtype=args.dtype, log=_log)
    _log(f"done in {time.perf_counter() - t0:.1f}s")
    return 0


def _check_speculation(args) -> None:
    """--draft / --speculate-k errors that need no model."""
    if args.speculate_k is not None and args.draft is None:
        raise ValueError("--speculate-k needs --draft (a model path or prompt_lookup)")
    from jaxlm.speculative import MAX_K

    if args.speculate_k is not None and not 1 <= args.speculate_k <= MAX_K:
        raise ValueError(f"--speculate-k {args.speculate_k} must be in [1, {MAX_K}]")


def cmd_generate(args) -> int:
    import json

    import jaxlm
    from jaxlm.api import GENERATE_NAMES
    from jaxlm.sampling import Sampling
    from jaxlm.speculative import DEFAULT_K

    mesh = _mesh_overrides("generate", args.overrides)
    # Bad settings fail at once, not after loading the model.
    Sampling(args.temperature, args.top_k, args.top_p, args.max_new_tokens, args.num_return_sequences,
             args.seed).check(names=GENERATE_NAMES)
    _check_speculation(args)
    lm = jaxlm.load(args.model, mesh=mesh)
    if lm.tokenizer is None:
        raise ValueError(f"{args.model} has no tokenizer files; use the Python API with token ids")
    rows = [lm.tokenizer.encode(p, add_special_tokens=False) for p in args.prompt]
    n = args.num_return_sequences
    kw = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
              top_p=args.top_p, seed=args.seed, num_return_sequences=n)
    stream = not args.json and len(rows) * n == 1 and not args.stop
    on_token = None
    if stream:
        printer = _TextStream(lm, args.prompt[0])
        on_token = printer.push
    if args.draft is not None:
        kw.update(draft=args.draft, speculate_k=args.speculate_k)
    out = lm.generate(rows, **kw, on_token=on_token)
    if args.draft is not None:
        _log(f"speculative decoding (draft {args.draft}, K={args.speculate_k or DEFAULT_K}): {lm.last_speculation}")
    for r, row in enumerate(out):
        prompt = args.prompt[r // n]
        text, ids = lm.continuation(row[-args.max_new_tokens:], args.stop)
        if args.json:
            print(json.dumps({"prompt": prompt, "text": text, "token_ids": ids, "sequence": r % n}), flush=True)
        elif stream:
            printer.finish(text)
        else:
            print(f"{prompt}{text}\n{'-' * 40}" if len(out) > 1 else f"{prompt}{text}", flush=True)
    return 0


def _mesh_overrides(command: str, overrides):
    """mesh.data=N mesh.fsdp=N mesh.tensor=N -> MeshConfig (None when none are given)."""
    from jaxlm.config import load_config

    if not overrides:
        return None
    bad = [o for o in overrides if not o.startswith("mesh.")]
    if bad:
        raise ValueError(f"jaxlm {command} takes only mesh.* settings (e.g. mesh.tensor=2); got {bad[0]!r}")
    return load_config(None, overrides).mesh


class _TextStream:
    """Prints a continuation as tokens arrive (holding back incomplete UTF-8 sequences)."""

    def __init__(self, lm, prompt):
        self.lm, self.prompt, self.ids, self.printed = lm, prompt, [], ""

    def push(self, step, tokens):
        if not self.ids:  # printed once generation has started (after input checks passed)
            print(self.prompt, end="", flush=True)
        self.ids.append(int(tokens[0]))
        text, _ = self.lm.continuation(self.ids)
        if not text.endswith("\ufffd") and len(text) > len(self.printed):
            print(text[len(self.printed):], end="", flush=True)
            self.printed = text

    def finish(self, text):
        print(text[len(self.printed):] if text.startswith(self.printed) else "", flush=True)


def cmd_serve(args) -> int:
    import signal

    import uvicorn

    import jaxlm
    from jaxlm.serve import Engine
    from jaxlm.serve.app import create_app

    mesh = _mesh_overrides("serve", args.overrides)
    template = None
    if args.chat_template is not None:
        template = Path(args.chat_template).read_text()  # a missing file fails before the model loads
    for name in ("max_batch", "max_queue", "port"):
        if getattr(args, name) < (1 if name != "max_queue" else 0):
            raise ValueError(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= "
                             f"{1 if name != 'max_queue' else 0}")
    _check_speculation(args)
    t0 = time.perf_counter()
    lm = jaxlm.load(args.model, mesh=mesh)
    engine = Engine(lm, max_batch=args.max_batch, max_len=args.max_len, max_queue=args.max_queue,
                    draft=args.draft, speculate_k=args.speculate_k)
    engine.warmup()
    name = args.served_model_name or Path(str(args.model).rstrip("/")).name
    app = create_app(engine, model_name=name, chat_template=template, drain_timeout=args.drain_timeout)
    speculation = f", draft {args.draft} proposing {engine.speculate_k}" if args.draft else ""
    _log(f"serving {name} ({lm.config.name}, {args.max_batch} slots of {engine.max_len} tokens{speculation}) on "
         f"http://{args.host}:{args.port} (ready in {time.perf_counter() - t0:.1f}s)")
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                            timeout_graceful_shutdown=args.drain_timeout)
    # SIGTERM: uvicorn stops accepting and finishes what is in flight, then re-raises the signal to
    # the handler it found: this one, so the process exits 0 after a clean drain.
    signal.signal(signal.SIGTERM, lambda *_: None)
    uvicorn.Server(config).run()
    _log("jaxlm serve: stopped")
    return 0


def cmd_train(args) -> int:
    from jaxlm.config import load_config
    from jaxlm.distributed import initialize
    from jaxlm.train import train

    config = args.config
    if config is None and Path(DEFAULT_CONFIG).is_file():
        config = DEFAULT_CONFIG
    cfg = load_config(config, args.overrides)  # bad keys fail here, before any process waits on others
    initialize(args.coordinator, args.num_processes, args.process_id, auto=args.distributed, log=_log)
    train(cfg, log=_log)
    return 0


def cmd_data_prepare(args) -> int:
    from jaxlm.config import load_config
    from jaxlm.data import prepared
    from jaxlm.train import data_tokenizer

    bad = [o for o in args.overrides if not o.startswith("data.")]
    if bad:
        raise ValueError(f"jaxlm data prepare takes only data.* settings; got {bad[0]!r}")
    if args.workers < 1:
        raise ValueError(f"--workers={args.workers} must be >= 1")
    cfg = load_config(args.config, args.overrides)
    tokenizer = data_tokenizer(cfg.data)
    runner = None
    if args.beam:
        from jaxlm.data.beam import prepare_with_beam

        runner = functools.partial(prepare_with_beam, pipeline_args=args.beam_args)
    for _, _, out, _ in prepared(cfg.data, tokenizer, _log, workers=args.workers, runner=runner):
        _log(f"ready: {out} (data.data_dir={cfg.data.data_dir or '~/.cache/jaxlm'})")
    return 0


def cmd_tokenizer_train(args) -> int:
    from jaxlm.data import file_texts, resolve_paths
    from jaxlm.io.atomic import atomic_dir, check_destination
    from jaxlm.tokenizer import train_tokenizer

    check_destination(args.out, overwrite=args.overwrite)  # before the (long) training
    files = [f for spec in args.data for f in resolve_paths(spec)]
    t0 = time.perf_counter()
    texts, stats = file_texts(files, log=_log)
    tok = train_tokenizer(texts, args.vocab_size, args.type, min_frequency=args.min_frequency)
    skipped = stats["skipped"]
    if not stats["bytes"]:
        raise ValueError(f"the {len(files)} files hold no text to train a tokenizer on"
                         + (f" ({len(skipped)} binary or not UTF-8)" if skipped else ""))
    with atomic_dir(args.out, args.overwrite) as tmp:
        tok.save(tmp)
    note = f"; skipped {len(skipped)} binary or non-UTF-8 files" if skipped else ""
    _log(f"trained a {args.type} tokenizer of {tok.vocab_size} tokens on {len(files) - len(skipped)} files in "
         f"{time.perf_counter() - t0:.1f}s{note}: {args.out} (use data.tokenizer={args.out})")
    return 0


def cmd_plot(args) -> int:
    from jaxlm.report import plot_losses

    out = plot_losses(args.workdir, args.output)
    _log(f"wrote {out}")
    return 0


def cmd_eval(args) -> int:
    import json

    from jaxlm.report import evaluate_model

    print(json.dumps(evaluate_model(args.model, args.overrides, split=args.split, batches=args.batches)))
    return 0


def _transform(args, fn, what: str) -> int:
    """Load SRC, apply ``fn(config, params) -> (config, params)``, save DST; print the sizes."""
    import jaxlm
    from jaxlm.api import LM
    from jaxlm.compress import count_params, nbytes
    from jaxlm.io import check_destination

    check_destination(args.dst, overwrite=args.overwrite)  # before any work
    t0 = time.perf_counter()
    lm = jaxlm.load(args.src)
    config, params = fn(lm.config, lm.params)
    out = LM(config, params, lm.tokenizer)
    out.save(args.dst, overwrite=args.overwrite)
    _log(f"{what}: {count_params(lm.params):,} params / {nbytes(lm.params) / 2**20:.1f} MiB -> "
         f"{count_params(out.params):,} params / {nbytes(out.params) / 2**20:.1f} MiB in {args.dst} "
         f"({time.perf_counter() - t0:.1f}s)")
    return 0


def cmd_merge(args) -> int:
    from jaxlm.compress.lora import merge_lora

    return _transform(args, merge_lora, "merged (LoRA adapters folded into the kernels)")


def cmd_export(args) -> int:
    from jaxlm.io import export

    t0 = time.perf_counter()
    export(args.src, args.dst, max_shard_size=args.max_shard_size, dtype=args.dtype, peft=args.peft,
           overwrite=args.overwrite, log=_log)
    _log(f"done in {time.perf_counter() - t0:.1f}s")
    return 0


def cmd_quantize(args) -> int:
    from jaxlm.compress.quantize import quantize_int8

    return _transform(args, quantize_int8, "int8 weight-only")


def cmd_lowrank(args) -> int:
    from jaxlm.compress.lowrank import factorize

    def fn(config, params):
        config, params = factorize(config, params, targets=args.targets, rank=args.rank, energy=args.energy)
        _log(f"rank {config.factor_rank} for {', '.join(config.factor_targets)}")
        return config, params

    return _transform(args, fn, "low-rank")


def cmd_prune(args) -> int:
    from jaxlm.compress.prune import apply_masks, check_sparsity, magnitude_masks, measured_sparsity, prune_heads

    if (args.sparsity is None) == (args.heads is None):
        raise ValueError("give --sparsity S (weights) or --heads K (attention heads kept per layer)")
    if args.sparsity is not None:
        check_sparsity(args.sparsity)

    def fn(config, params):
        if args.heads is not None:
            config, params, chosen = prune_heads(config, params, args.heads)
            _log(f"kept heads per layer: {'; '.join(','.join(map(str, c)) for c in chosen.tolist())}")
            return config, params
        params = apply_masks(params, magnitude_masks(params, args.sparsity, scope=args.scope))
        _log(f"block-kernel sparsity {measured_sparsity(params):.4f} ({args.scope})")
        return config, params

    return _transform(args, fn, "pruned")


DEFAULT_CONFIG = str(Path(__file__).resolve().parent.parent / "configs" / "quickstart.yaml")


class _Parser(argparse.ArgumentParser):
    """argparse with its errors in one line, like every other jaxlm error (the usage is one
    ``--help`` away); subcommand parsers are of this class too."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="jaxlm", description="Transformer language models in JAX/Flax.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    c = sub.add_parser("convert", help="Hugging Face model dir or hub id -> jaxlm model dir",
                       description="Convert a Hugging Face checkpoint (GPT-2, BERT, Llama, Mistral, Qwen 2 / 3, "
                                   "Gemma 1 / 2) to a jaxlm model dir.")
    c.add_argument("src", metavar="SRC", help="HF model directory (or hub id where the hub is reachable)")
    c.add_argument("dst", metavar="DST", help="output directory (must not exist or be empty)")
    c.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="cast the weights (default: as stored)")
    c.add_argument("--overwrite", action="store_true", help="replace a non-empty DST (only once the new one is complete)")
    c.set_defaults(func=cmd_convert)

    g = sub.add_parser("generate", help="continue prompts with a model",
                       description="Generate text. Streams to the terminal; --json prints one object per line.")
    g.add_argument("model", metavar="MODEL", help="jaxlm model dir, training workdir, HF model dir or hub id")
    g.add_argument("overrides", nargs="*", default=[], metavar="mesh.AXIS=N",
                   help="spread the model over devices, e.g. mesh.tensor=4 (default: one device)")
    g.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for a batch)")
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--num-return-sequences", type=int, default=1)
    g.add_argument("--stop", action="append", help="cut the text before this string (repeatable)")
    g.add_argument("--json", action="store_true", help="one JSON object per output: prompt, text, token_ids")
    g.add_argument("--draft", metavar="PATH", help="speculative decoding: a small model with the same tokenizer "
                   "that proposes tokens (any model path jaxlm loads), or prompt_lookup (n-grams of the text so far); "
                   "the output follows MODEL's distribution exactly")
    g.add_argument("--speculate-k", type=int, metavar="K", help="tokens the draft proposes per step (default 4)")
    g.set_defaults(func=cmd_generate)

    sv = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (continuous batching)",
                        description="Serve a decoder over OpenAI's API: /v1/models, /v1/completions, "
                                    "/v1/chat/completions (streaming with stream=true), /health, /metrics.")
    sv.add_argument("model", metavar="MODEL", help="jaxlm model dir, training workdir, HF model dir or hub id")
    sv.add_argument("overrides", nargs="*", default=[], metavar="mesh.AXIS=N",
                    help="spread the model over devices, e.g. mesh.tensor=4 (default: one device)")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--max-batch", type=int, default=8, help="requests decoded together (slots; default 8)")
    sv.add_argument("--max-len", type=int, help="cache positions per slot: prompt + new tokens (default: the "
                    "model's context, at most 2048)")
    sv.add_argument("--max-queue", type=int, default=256, help="requests waiting for a slot before new ones get "
                    "429 (default 256)")
    sv.add_argument("--chat-template", metavar="FILE", help="Jinja chat template (default: the tokenizer's)")
    sv.add_argument("--served-model-name", help="the model id clients use (default: MODEL's last path part)")
    sv.add_argument("--drain-timeout", type=float, default=30.0, help="seconds to finish requests in flight "
                    "after SIGTERM (default 30)")
    sv.add_argument("--draft", metavar="PATH", help="speculative decoding: a small model with the same tokenizer "
                    "(any model path jaxlm loads), or prompt_lookup; each slot advances up to K + 1 tokens per "
                    "step, following MODEL's distribution exactly")
    sv.add_argument("--speculate-k", type=int, metavar="K", help="tokens the draft proposes per step (default 4)")
    sv.set_defaults(func=cmd_serve)

    t = sub.add_parser("train", help="train or fine-tune (resumes from the workdir's latest checkpoint)",
                       description="Train a model. With no arguments: the quickstart (a small byte-level "
                                   "GPT on the Python standard library, a few minutes on a CPU).")
    t.add_argument("--config", help="YAML file of overrides (default: configs/quickstart.yaml)")
    t.add_argument("overrides", nargs="*", default=[], metavar="KEY=VALUE",
                   help="e.g. train.steps=100 model.n_layers=4 mesh.data=2 mesh.fsdp=2 mesh.tensor=2")
    d = t.add_argument_group("multi-host", "one process per host; on TPU pods and under SLURM (several "
                             "tasks) the processes find each other by themselves")
    d.add_argument("--distributed", action="store_true",
                   help="join a multi-process run that JAX detects (TPU pod slice, SLURM, ...)")
    d.add_argument("--coordinator", metavar="HOST:PORT", help="address of process 0 (explicit setup)")
    d.add_argument("--num-processes", type=int, metavar="N")
    d.add_argument("--process-id", type=int, metavar="I", help="0 .. N-1")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="loss / perplexity (and MLM accuracy) of a model on a split, as JSON")
    e.add_argument("model", metavar="MODEL", help="training workdir, jaxlm model dir or HF model dir")
    e.add_argument("overrides", nargs="*", default=[], metavar="KEY=VALUE",
                   help="data.*, train.objective and mesh.* settings (default: the workdir's data, else "
                        "the default corpus; one device)")
    e.add_argument("--split", default="validation")
    e.add_argument("--batches", type=int, default=16)
    e.set_defaults(func=cmd_eval)

    def transform(name, help_text):
        x = sub.add_parser(name, help=help_text, description=help_text + ". SRC: any model jaxlm.load "
                           "accepts (model dir, training workdir, HF dir); DST: a new jaxlm model dir.")
        x.add_argument("src", metavar="SRC")
        x.add_argument("dst", metavar="DST")
        x.add_argument("--overwrite", action="store_true", help="replace a non-empty DST")
        return x

    ex = sub.add_parser("export", help="jaxlm model dir or training workdir -> Hugging Face model dir",
                        description="Write a Hugging Face model dir (config.json, generation_config.json, "
                                    "safetensors, tokenizer files) that transformers loads; LoRA adapters are "
                                    "merged into the kernels.")
    ex.add_argument("src", metavar="SRC", help="jaxlm model dir, training workdir (latest checkpoint) or HF dir")
    ex.add_argument("dst", metavar="DST", help="output directory (must not exist or be empty)")
    ex.add_argument("--max-shard-size", default="5GB", help="split the weights into safetensors shards of at most "
                    "this size, with an index (default 5GB)")
    ex.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                    help="cast the weights (default: as stored)")
    ex.add_argument("--peft", action="store_true", help="write LoRA adapters as a PEFT adapter dir (DST/adapter) "
                    "beside the base model instead of merging them")
    ex.add_argument("--overwrite", action="store_true", help="replace a non-empty DST (only once the new one is complete)")
    ex.set_defaults(func=cmd_export)
    transform("merge", "write a jaxlm model dir with LoRA adapters merged into the kernels").set_defaults(func=cmd_merge)
    transform("quantize", "int8 weight-only copy (per-output-channel scales)").set_defaults(func=cmd_quantize)
    lr = transform("lowrank", "replace block kernels by rank-r SVD factors")
    lr.add_argument("--rank", type=int, help="the rank of every factored kernel")
    lr.add_argument("--energy", type=float, help="or: the fraction of squared singular values to keep, e.g. 0.9")
    lr.add_argument("--targets", default="up,down", help="block kernels to factor (default: up,down)")
    lr.set_defaults(func=cmd_lowrank)
    pr = transform("prune", "zero the smallest-magnitude block-kernel weights, or drop attention heads")
    pr.add_argument("--sparsity", type=float, help="fraction of weights set to zero, in [0, 1)")
    pr.add_argument("--heads", type=int, help="attention heads kept in each layer (the most important by "
                    "||W_v|| ||W_o||): a smaller model")
    pr.add_argument("--scope", choices=("global", "layer"), default="global")
    pr.set_defaults(func=cmd_prune)

    tk = sub.add_parser("tokenizer", help="train a tokenizer on text files (for data.tokenizer=)")
    tks = tk.add_subparsers(dest="action", required=True, metavar="ACTION")
    tt = tks.add_parser("train", help="train a BPE / WordPiece / Unigram tokenizer with the tokenizers library",
                        description="Train a tokenizer on DATA (files, directories, globs; binary or non-UTF-8 "
                                    "files are skipped and counted) and write tokenizer.json + "
                                    "tokenizer_config.json to --out, for data.tokenizer=OUT.")
    tt.add_argument("data", nargs="+", metavar="DATA")
    tt.add_argument("--vocab-size", type=int, required=True)
    tt.add_argument("--type", choices=("bpe", "wordpiece", "unigram"), default="bpe",
                    help="bpe: GPT-2's byte level (every text round-trips; default); wordpiece: BERT's; unigram")
    tt.add_argument("--min-frequency", type=int, default=2, help="pairs seen fewer times are not merged (default 2)")
    tt.add_argument("--out", "-o", default="tokenizer", help="output directory (default: tokenizer)")
    tt.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    tt.set_defaults(func=cmd_tokenizer_train)

    dt = sub.add_parser("data", help="prepare training data ahead of time (token shards)")
    dts = dt.add_subparsers(dest="action", required=True, metavar="ACTION")
    dp = dts.add_parser("prepare", help="tokenize the data.* sources into token shards (what jaxlm train reads)",
                        description="Tokenize every source of the data settings (data.path, data.tfds_name or "
                                    "data.mixture; data.tokenizer, data.data_dir) into token shards, as jaxlm "
                                    "train would before its first step. Resumable: complete shards are kept. "
                                    "With --beam, the work runs as an Apache Beam pipeline; other --options "
                                    "are Beam pipeline options (e.g. --runner=DataflowRunner --project=P).")
    dp.add_argument("--config", help="YAML file of overrides (its data.* settings are used)")
    dp.add_argument("overrides", nargs="*", default=[], metavar="KEY=VALUE", help="data.* settings")
    dp.add_argument("--workers", type=int, default=1, help="local processes sharing the work (default 1)")
    dp.add_argument("--beam", action="store_true", help="run as an Apache Beam pipeline (pip install 'jaxlm[beam]')")
    dp.set_defaults(func=cmd_data_prepare)

    pl = sub.add_parser("plot", help="PNG of the training and validation loss curves of a workdir")
    pl.add_argument("workdir", metavar="WORKDIR")
    pl.add_argument("-o", "--output", help="PNG path (default: WORKDIR/loss.png)")
    pl.set_defaults(func=cmd_plot)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if getattr(args, "beam", False):  # `jaxlm data prepare --beam`: other --options are Beam's
        args.beam_args = [e for e in extra if e.startswith("--")]
        extra = [e for e in extra if not e.startswith("--")]
    # KEY=VALUE settings may come anywhere, also after options (argparse takes them only before).
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args)
    except KeyboardInterrupt:
        _log("jaxlm: interrupted")
        return 130
    except (ValueError, OSError, RuntimeError) as e:  # includes TrainingError
        command = " ".join(filter(None, (args.command, getattr(args, "action", None))))
        _log(f"jaxlm {command}: error: {e}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
