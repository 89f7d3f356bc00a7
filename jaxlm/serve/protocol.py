"""The OpenAI API's request checks and response shapes (completions and chat completions).

Every field is read here: a field jaxlm implements is checked (type and range), a field it does
not implement is refused by name unless it carries its no-op value (``presence_penalty: 0``,
``echo: false``, ...), so nothing a client asks for is silently ignored.
"""

from __future__ import annotations

import dataclasses
import time
import uuid

from jaxlm.sampling import Sampling


class APIError(Exception):
    """An error answered as OpenAI's ``{"error": {...}}`` with an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


# Fields of OpenAI's API that jaxlm does not implement, with the values that ask for nothing.
_NOOP = {
    "presence_penalty": lambda v: v in (None, 0), "frequency_penalty": lambda v: v in (None, 0),
    "logit_bias": lambda v: not v, "echo": lambda v: v in (None, False), "suffix": lambda v: v in (None, ""),
    "best_of": lambda v: v in (None, 1), "tools": lambda v: not v, "tool_choice": lambda v: v in (None, "none"),
    "functions": lambda v: not v, "function_call": lambda v: v in (None, "none"),
    "parallel_tool_calls": lambda v: v is None, "response_format": lambda v: v in (None, {"type": "text"}),
    "store": lambda v: v in (None, False), "metadata": lambda v: not v, "service_tier": lambda v: v in (None, "auto"),
    "modalities": lambda v: v in (None, ["text"]), "prediction": lambda v: v is None,
    "reasoning_effort": lambda v: v is None, "audio": lambda v: v is None, "web_search_options": lambda v: v is None,
}
_COMMON = {"model", "max_tokens", "temperature", "top_p", "top_k", "n", "stream", "stream_options", "stop", "seed",
           "logprobs", "user"}
COMPLETION_FIELDS = _COMMON | {"prompt"}
CHAT_FIELDS = _COMMON | {"messages", "max_completion_tokens", "top_logprobs"}


def check_fields(body, allowed: set[str]) -> None:
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    for name, value in body.items():
        if name in allowed:
            continue
        if name in _NOOP and _NOOP[name](value):
            continue
        what = "is not supported by jaxlm" if name in _NOOP else "is not a field of this endpoint"
        raise APIError(400, f"{name!r} {what}", param=name, code="unsupported_parameter")


@dataclasses.dataclass(frozen=True)
class RequestSampling:
    """A request's ``Sampling`` as sent (checked by ``Engine.check``, which calls
    ``Sampling.check``) and the request's names for its fields, for the error messages."""

    sampling: Sampling
    names: dict


def sampling_of(body: dict, *, chat: bool, default_max_tokens: int | None) -> RequestSampling:
    """The ``Sampling`` a request body asks for, with the OpenAI API's defaults (temperature 1);
    its values are checked by ``Sampling.check``, the fields that are the protocol's own here."""
    def get(name, check, message, default=None):
        value = body.get(name)
        if value is None:
            return default
        if not check(value):
            raise APIError(400, f"{name}={value!r}: {message}", param=name)
        return value

    names = {}
    max_tokens = body.get("max_tokens")
    if chat and body.get("max_completion_tokens") is not None:
        max_tokens, names["max_tokens"] = body["max_completion_tokens"], "max_completion_tokens"
    if chat:
        want = get("logprobs", lambda v: isinstance(v, bool), "must be true or false", False)
        top = body.get("top_logprobs")
        if top is not None and not want:
            raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
        logprobs = (0 if top is None else top) if want else None
        names["logprobs"] = "top_logprobs"
    else:
        logprobs = body.get("logprobs")
    get("stream", lambda v: isinstance(v, bool), "must be true or false")
    get("stream_options", lambda v: isinstance(v, dict) and set(v) <= {"include_usage"},
        "only {\"include_usage\": bool} is supported")
    get("user", lambda v: isinstance(v, str), "must be a string")
    fields = {f: body.get(f) for f in ("temperature", "top_p", "top_k", "n", "seed", "stop")}
    defaults = dict(temperature=1.0, top_p=1.0, top_k=0, n=1, seed=None, stop=())
    sampling = Sampling(**{f: defaults[f] if v is None else v for f, v in fields.items()}, logprobs=logprobs,
                        max_tokens=default_max_tokens if max_tokens is None else max_tokens)
    return RequestSampling(sampling, names)


def prompts_of(body: dict) -> list:
    """The prompts of a completions request: strings or token-id lists."""
    prompt = body.get("prompt")
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt)):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(
            isinstance(p, str) or (isinstance(p, list) and p and all(_is_int(t) for t in p)) for p in prompt):
        return prompt
    raise APIError(400, "prompt must be a string, a list of strings, or token ids", param="prompt")


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_logprobs(tokenizer, ids, logprobs, tops, offset: int = 0) -> dict:
    """The legacy completions ``logprobs`` object for tokens ``ids``."""
    texts = [tokenizer.decode([i]) for i in ids]
    offsets, pos = [], offset
    for t in texts:
        offsets.append(pos)
        pos += len(t)
    return {"tokens": texts, "token_logprobs": list(logprobs),
            "top_logprobs": [{tokenizer.decode([i]): lp for i, lp in top} for top in tops], "text_offset": offsets}


def chat_logprobs(tokenizer, ids, logprobs, tops) -> dict:
    """The chat ``logprobs`` object (``content``: one entry per token) for tokens ``ids``."""
    def entry(i, lp):
        t = tokenizer.decode([i])
        return {"token": t, "logprob": lp, "bytes": list(t.encode("utf-8"))}

    return {"content": [{**entry(i, lp), "top_logprobs": [entry(j, x) for j, x in top]}
                        for i, lp, top in zip(ids, logprobs, tops)]}
