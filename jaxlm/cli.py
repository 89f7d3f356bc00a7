"""The ``jaxlm`` command. Bad input exits non-zero with one line on stderr, never a traceback."""

from __future__ import annotations

import argparse
import sys
import time


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def cmd_convert(args) -> int:
    from jaxlm.convert import convert, local_dir

    t0 = time.perf_counter()
    convert(local_dir(args.src), args.dst, overwrite=args.overwrite, log=_log)
    _log(f"done in {time.perf_counter() - t0:.1f}s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jaxlm", description="Transformer language models in JAX/Flax.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    c = sub.add_parser("convert", help="Hugging Face model dir or hub id -> jaxlm model dir",
                       description="Convert a Hugging Face GPT-2 or BERT checkpoint to a jaxlm model dir.")
    c.add_argument("src", metavar="SRC", help="HF model directory (or hub id where the hub is reachable)")
    c.add_argument("dst", metavar="DST", help="output directory (must not exist or be empty)")
    c.add_argument("--overwrite", action="store_true", help="replace a non-empty DST (only once the new one is complete)")
    c.set_defaults(func=cmd_convert)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        _log("jaxlm: interrupted")
        return 130
    except (ValueError, OSError, RuntimeError) as e:
        _log(f"jaxlm {args.command}: error: {e}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
