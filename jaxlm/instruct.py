"""Instruction and preference data: JSONL examples -> token rows with per-token loss weights
(``train.objective=sft`` and ``dpo``).

One example per line of ``data.path``'s JSONL files (blank lines skipped); a directory holding
``train.jsonl`` and ``validation.jsonl`` gives the splits, otherwise examples are split by a hash of
their file and line (``data.val_fraction``):

- sft: ``{"messages": [{"role": ..., "content": ...}, ...]}`` (the OpenAI chat format) or
  ``{"prompt": str, "completion": str}``.
- dpo: ``{"prompt": str, "chosen": str, "rejected": str}``; or ``prompt`` as a list of messages and
  ``chosen`` / ``rejected`` as a string or a list of (assistant) messages each; or ``chosen`` and
  ``rejected`` as whole conversations (their common first messages are the prompt; a ``prompt``
  beside them is ignored).

Chat messages are rendered with the chat template (``data.chat_template``, else the tokenizer's
own) piece by piece: for each assistant turn, the text up to it (with the generation prompt) is
context and the turn itself, the template's end-of-turn text included, is learned. Each piece is
tokenized on its own, without special tokens, as ``lm.generate`` and the server tokenize a prompt;
an EOS token, learned, ends an example whose last piece is learned (so the model learns to stop).
A prompt / completion pair is the two strings, the completion learned, then EOS.

An example (token ids x_0..x_n, learned flags) trains as inputs x_0..x_{n-1}, targets x_1..x_n,
weights = the targets' flags, so the loss is the mean over learned tokens. Examples longer than
``data.seq_len`` (n > seq_len) are skipped and counted, never truncated (a cut answer teaches the
model to stop mid-sentence).

Rows (``data.packing``): ``segments`` packs examples into rows of ``seq_len`` (best fit,
longest first), each with its own segment id, so no example attends to another and positions
restart per example; ``pad`` puts one example in each row. DPO pairs are [2, seq_len] rows
(chosen, rejected), one pair per row.
"""

from __future__ import annotations

import ast
import json
import os
import textwrap
import warnings
from collections import deque
from pathlib import Path

import numpy as np

from jaxlm.chat import ChatTemplateError, check_messages, render
from jaxlm.data import default_corpus_files, in_validation, resolve_paths, stdlib_dir

ROLES = ("system", "user", "assistant", "tool")
FIELDS = ("inputs", "targets", "weights", "segments")


class ExampleError(ValueError):
    """A bad example: the message names the file and line."""


def read_jsonl(data_cfg, split: str) -> list[tuple[str, dict]]:
    """(where, example) of the split: "FILE line N" and the parsed line, split by a hash of where."""
    if not data_cfg.path:
        raise ValueError("train.objective=sft / dpo needs examples: data.path=FILE.jsonl (files, directories or "
                         "globs of JSONL)")
    p = Path(data_cfg.path).expanduser()
    named = {s: p / f"{s}.jsonl" for s in ("train", "validation")}
    given = p.is_dir() and all(f.is_file() for f in named.values())  # the splits, as files
    files = list(named.values()) if given else resolve_paths(data_cfg.path)
    root = os.path.commonpath([str(f.parent) for f in files])
    out = {"train": [], "validation": []}
    for f in files:
        rel = os.path.relpath(f, root)
        with open(f, encoding="utf-8") as fh:
            for i, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    ex = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ExampleError(f"{f} line {i}: not JSON ({e.msg})") from None
                if not isinstance(ex, dict):
                    raise ExampleError(f"{f} line {i}: an example must be a JSON object")
                val = f.stem == "validation" if given else in_validation(f"{rel}:{i}", data_cfg.val_fraction)
                out["validation" if val else "train"].append((f"{f} line {i}", ex))
    if not out["validation"] and len(out["train"]) > 1:  # tiny inputs: keep one example for validation
        out["validation"].append(out["train"].pop())
    return out[split]


class Renderer:
    """Examples -> token ids and learned flags with one tokenizer and chat template."""

    def __init__(self, tokenizer, template: str | None):
        self.tok, self.template = tokenizer, template
        self.special = dict(tokenizer.special_tokens)
        self.eos = tokenizer.eos_id

    def chat_pieces(self, messages, where: str, learn_from: int = 0) -> list[tuple[str, bool]]:
        """(text, learned) pieces of a conversation; assistant turns at index >= learn_from are learned."""
        if self.template is None:
            raise ExampleError(f"{where}: chat messages need a chat template, and the tokenizer has none; "
                               "set data.chat_template=FILE.jinja")
        try:
            msgs = check_messages(messages)
        except ValueError as e:
            raise ExampleError(f"{where}: {e}") from None
        for m in msgs:
            if m["role"] not in ROLES:
                raise ExampleError(f"{where}: role {m['role']!r} is not one of {', '.join(ROLES)}")
        if not any(m["role"] == "assistant" for m in msgs[learn_from:]):
            raise ExampleError(f"{where}: no assistant message to learn")
        pieces, done = [], ""
        try:
            for i, m in enumerate(msgs):
                if m["role"] != "assistant" or i < learn_from:
                    continue
                context = render(self.template, msgs[:i], add_generation_prompt=True, **self.special) if i else ""
                turn = render(self.template, msgs[:i + 1], add_generation_prompt=False, **self.special)
                if not (context.startswith(done) and turn.startswith(context)):
                    raise ExampleError(f"{where}: the chat template does not render this conversation prefix by "
                                       f"prefix (at message {i}), so its assistant tokens cannot be told apart")
                pieces += [(context[len(done):], False), (turn[len(context):], True)]
                done = turn
            whole = render(self.template, msgs, add_generation_prompt=False, **self.special)
        except ChatTemplateError as e:
            raise ExampleError(f"{where}: {e}") from None
        if whole.startswith(done) and len(whole) > len(done):
            pieces.append((whole[len(done):], False))
        return pieces

    def encode(self, pieces: list[tuple[str, bool]]) -> tuple[np.ndarray, np.ndarray]:
        """Token ids and learned flags of the pieces; EOS (learned) after a final learned piece."""
        texts = [t for t, _ in pieces if t]
        flags = [f for t, f in pieces if t]
        ids, learn = [], []
        for toks, flag in zip(self.tok.encode_batch(texts), flags):
            ids += toks
            learn += [flag] * len(toks)
        if pieces and pieces[-1][1] and self.eos is not None and (not ids or ids[-1] != self.eos):
            ids.append(self.eos)
            learn.append(True)
        return np.asarray(ids, np.int32), np.asarray(learn, bool)

    def sft(self, ex: dict, where: str):
        if "messages" in ex:
            return self.encode(self.chat_pieces(ex["messages"], where))
        if isinstance(ex.get("prompt"), str) and isinstance(ex.get("completion"), str):
            return self.encode([(ex["prompt"], False), (ex["completion"], True)])
        raise ExampleError(f"{where}: an sft example needs \"messages\" (a list) or \"prompt\" and \"completion\" "
                           f"(strings); it has {', '.join(map(repr, ex)) or 'no keys'}")

    def dpo(self, ex: dict, where: str):
        """((ids, learned) of the chosen response, of the rejected one)."""
        missing = [k for k in ("chosen", "rejected") if k not in ex]
        if missing:
            raise ExampleError(f"{where}: a dpo example needs \"chosen\" and \"rejected\" (and \"prompt\", unless "
                               f"both are whole conversations); it lacks {', '.join(map(repr, missing))}")
        prompt, out = ex.get("prompt"), []
        c, r = ex["chosen"], ex["rejected"]
        if isinstance(prompt, str) and isinstance(c, str) and isinstance(r, str):
            return tuple(self.encode([(prompt, False), (ex[k], True)]) for k in ("chosen", "rejected"))
        if isinstance(c, list) and isinstance(r, list) and (
                prompt is None or isinstance(prompt, str) or (c[:len(prompt)] == prompt == r[:len(prompt)])):
            # Whole conversations (a string prompt is their first user turn, as in UltraFeedback):
            # the common first messages are the prompt.
            n = 0
            while n < min(len(c), len(r)) and c[n] == r[n]:
                n += 1
            return self.encode(self.chat_pieces(c, where, n)), self.encode(self.chat_pieces(r, where, n))
        if prompt is None:
            raise ExampleError(f"{where}: without \"prompt\", \"chosen\" and \"rejected\" must be message lists")
        if not isinstance(prompt, list):
            raise ExampleError(f"{where}: with a string \"prompt\", \"chosen\" and \"rejected\" must both be strings "
                               "or both whole conversations (message lists)")
        for k in ("chosen", "rejected"):
            v = ex[k]
            response = [{"role": "assistant", "content": v}] if isinstance(v, str) else v
            if not isinstance(response, list):
                raise ExampleError(f"{where}: \"{k}\" must be a string or a list of messages")
            out.append(self.encode(self.chat_pieces(prompt + response, where, len(prompt))))
        return tuple(out)


class ExampleRows:
    """Training rows of examples: row i is {"inputs", "targets", "weights", "segments"} of [T]
    (sft) or [2, T] (dpo pairs). ``seq_len`` is T; ``stats`` says what went in."""

    def __init__(self, arrays: dict[str, np.ndarray], seq_len: int, stats: dict):
        self.arrays, self.seq_len, self.stats = arrays, seq_len, stats

    def __len__(self):
        return len(self.arrays["inputs"])

    def padded(self, multiple: int) -> "ExampleRows":
        """These rows and empty ones (nothing learned, all padding) up to a multiple of
        ``multiple``: a small validation split still fills whole batches, and scores the same."""
        extra = -len(self) % multiple
        if not extra:
            return self
        return ExampleRows({k: np.concatenate([v, np.zeros((extra, *v.shape[1:]), v.dtype)])
                            for k, v in self.arrays.items()}, self.seq_len, self.stats)

    def __getitem__(self, i):
        return {k: v[int(i)] for k, v in self.arrays.items()}


def pack(lengths, capacity: int) -> list[list[int]]:
    """Bins of example indices, each bin's lengths summing to <= capacity: best fit, longest
    first (deterministic; ties in input order)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    free = np.zeros(capacity + 1, np.int64)  # free[c]: how many open bins have exactly c free
    by_free: dict[int, list[int]] = {}
    bins: list[list[int]] = []
    for i in order:
        n = lengths[i]
        fits = np.flatnonzero(free[n:])
        if len(fits):
            c = n + int(fits[0])  # the fullest bin that still fits
            b = by_free[c].pop()
            free[c] -= 1
        else:
            c, b = capacity, len(bins)
            bins.append([])
        bins[b].append(i)
        free[c - n] += 1
        by_free.setdefault(c - n, []).append(b)
    return bins


def _rows(examples, seq_len: int, packing: str) -> dict[str, np.ndarray]:
    """[R, T] arrays of (ids, learned) examples, packed or one per row."""
    lengths = [len(ids) - 1 for ids, _ in examples]
    bins = pack(lengths, seq_len) if packing == "segments" else [[i] for i in range(len(examples))]
    out = {k: np.zeros((len(bins), seq_len), np.float32 if k == "weights" else np.int32) for k in FIELDS}
    for r, b in enumerate(bins):
        at = 0
        for s, i in enumerate(b, 1):
            ids, learn = examples[i]
            n = len(ids) - 1
            out["inputs"][r, at:at + n] = ids[:-1]
            out["targets"][r, at:at + n] = ids[1:]
            out["weights"][r, at:at + n] = learn[1:]
            out["segments"][r, at:at + n] = s
            at += n
    return out


def example_rows(data_cfg, split: str, tokenizer, *, pairs: bool, packing: str, template: str | None = None,
                 log=None, what: str = "") -> ExampleRows:
    """The split's examples as training rows (see the module docstring): sft examples, or dpo
    ``pairs``; ``packing``: segments or pad; ``what`` names them in the log line."""
    renderer = Renderer(tokenizer, template)
    seq_len = data_cfg.seq_len
    kept, skipped, empty = [], 0, 0
    for where, ex in read_jsonl(data_cfg, split):
        encoded = renderer.dpo(ex, where) if pairs else (renderer.sft(ex, where),)
        if any(len(ids) < 2 or not learn[1:].any() for ids, learn in encoded):
            empty += 1
        elif any(len(ids) - 1 > seq_len for ids, _ in encoded):
            skipped += 1
        else:
            kept.append(encoded if pairs else encoded[0])
    if not kept:
        raise ValueError(f"no {split} examples of {data_cfg.path} fit data.seq_len={seq_len} ({skipped} longer, "
                         f"{empty} with nothing to learn)")
    if pairs:
        halves = [_rows([p[j] for p in kept], seq_len, "pad") for j in (0, 1)]
        arrays = {k: np.stack([halves[0][k], halves[1][k]], axis=1) for k in FIELDS}
    else:
        arrays = _rows(kept, seq_len, packing)
    learned = int(arrays["weights"].sum())
    tokens = int((arrays["segments"] > 0).sum())
    stats = {"examples": len(kept), "skipped_long": skipped, "skipped_empty": empty, "rows": len(arrays["inputs"]),
             "learned_tokens": learned, "tokens": tokens,
             "fill": tokens / max(1, arrays["segments"].size)}
    if log is not None:
        log(f"{what} {split}: {len(kept)} {'pairs' if pairs else 'examples'} in {stats['rows']} rows of {seq_len} "
            f"({packing}, {stats['fill']:.0%} filled; {learned} learned tokens); skipped {skipped} longer than "
            "data.seq_len" + (f" and {empty} with nothing to learn" if empty else ""))
    return ExampleRows(arrays, seq_len, stats)


def chat_template(data_cfg, tokenizer) -> str | None:
    """data.chat_template (a Jinja file), else the tokenizer's own template, else None."""
    if data_cfg.chat_template:
        p = Path(data_cfg.chat_template).expanduser()
        if not p.is_file():
            raise FileNotFoundError(f"data.chat_template={data_cfg.chat_template} does not exist")
        return p.read_text(encoding="utf-8")
    return tokenizer.chat_template


_STATEMENT_FIELDS = frozenset({"body", "handlers", "orelse", "finalbody", "cases"})


def _function_defs(tree):
    """The function definitions ``ast.walk`` finds, in its (breadth-first) order, visiting only
    statements (and except / case clauses): a definition is a statement, never inside an expression,
    so the expressions (most of a module's nodes) need no visit."""
    todo = deque([tree])
    while todo:
        node = todo.popleft()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node
        for name in node._fields:  # in field order, as ast.iter_child_nodes
            if name in _STATEMENT_FIELDS:
                value = getattr(node, name, None)
                if isinstance(value, list):
                    todo.extend(value)


def _functions(text: str):
    """(prompt, body) of each function with a docstring and at least two more lines: the def
    line(s) and docstring, and the rest, dedented."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # invalid escapes in old sources
            tree = ast.parse(text)
    except (SyntaxError, ValueError):  # a few test files are invalid on purpose
        return
    lines = text.splitlines()
    for node in _function_defs(tree):
        if not (ast.get_docstring(node) and len(node.body) >= 2):
            continue
        block = textwrap.dedent("\n".join(lines[node.lineno - 1:node.end_lineno])).splitlines()
        k = node.body[0].end_lineno - node.lineno + 1
        prompt, body = block[:k], [line for line in block[k:] if line.strip()]
        if len(body) >= 2 and len(set(body)) > 1 and block[0].lstrip().startswith(("def ", "async def ")):
            yield "\n".join(prompt) + "\n", "\n".join(body) + "\n"


def _broken_order(prompt: str, body: str, rng, tries: int = 20) -> str | None:
    """The body's lines in an order that no longer compiles (clearly worse code: a reordering that
    still compiles may mean the same, e.g. two independent assignments), or None if none is found."""
    def compiles(text):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                compile(prompt + text, "<task>", "exec")
            return True
        except (SyntaxError, ValueError):
            return False

    if not compiles(body):
        return None
    lines = body.splitlines(keepends=True)
    for _ in range(tries):
        text = "".join(lines[i] for i in rng.permutation(len(lines)))
        if not compiles(text):
            return text
    return None


def docstring_tasks(out_dir, *, max_chars: int = 320, val_fraction: float = 0.1, seed: int = 0,
                    files=None) -> dict:
    """The offline post-training demo, from the standard library's functions that have a docstring
    (split by file: validation functions come from unseen files):

    - OUT/sft/{train,validation}.jsonl: {"prompt": def line and docstring, "completion": the body};
    - OUT/dpo/{train,validation}.jsonl: {"prompt", "chosen": the real body, "rejected": the same
      lines in an order that no longer compiles} (functions with no such order are left out).

    Functions longer than ``max_chars`` (prompt and body) are left out; ``files``: a subset of the
    standard library's files (default: all). Returns the counts."""
    rng = np.random.default_rng(seed)
    root, out, seen = stdlib_dir(), Path(out_dir), set()
    rows = {(t, s): [] for t in ("sft", "dpo") for s in ("train", "validation")}
    for f in default_corpus_files() if files is None else files:
        rel = str(f.relative_to(root))
        split = "validation" if in_validation(rel, val_fraction) else "train"
        for prompt, body in _functions(f.read_text(encoding="utf-8", errors="replace")):
            if len(prompt) + len(body) > max_chars or (prompt, body) in seen:
                continue
            seen.add((prompt, body))
            rows["sft", split].append({"prompt": prompt, "completion": body})
            rejected = _broken_order(prompt, body, rng)
            if rejected is not None:
                rows["dpo", split].append({"prompt": prompt, "chosen": body, "rejected": rejected})
    for (task, split), items in rows.items():
        (out / task).mkdir(parents=True, exist_ok=True)
        (out / task / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in items))
    return {f"{t}_{s}": len(v) for (t, s), v in rows.items()}
