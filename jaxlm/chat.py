"""Chat templates: OpenAI-style messages -> one prompt string, with the Jinja template a model's
tokenizer ships (``tokenizer_config.json``'s ``chat_template`` or ``chat_template.jinja``),
rendered as transformers' ``apply_chat_template`` renders it (sandboxed Jinja, trimmed blocks,
``raise_exception``, ``bos_token`` / ``eos_token`` and the other special tokens as variables).
"""

from __future__ import annotations

import functools
import json
from datetime import datetime


class ChatTemplateError(ValueError):
    """The template refused the messages (its ``raise_exception``) or failed to render."""


@functools.lru_cache(maxsize=8)
def _compile(template: str):
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise ChatTemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(x, indent=indent,
                                                                                 ensure_ascii=ensure_ascii)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except TemplateError as e:
        raise ChatTemplateError(f"the chat template does not parse: {e}") from None


def check_messages(messages) -> list[dict]:
    """Messages as a list of {"role": str, "content": str | list of {"type": "text", "text": str}}
    (text parts are joined); one clear error for anything else."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {\"role\", \"content\"} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ValueError(f"messages[{i}] must be an object with a string \"role\"")
        content = m.get("content")
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise ValueError(f"messages[{i}].content: only text parts ({{\"type\": \"text\", \"text\": ...}}) "
                                 "are supported")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise ValueError(f"messages[{i}].content must be a string or a list of text parts")
        out.append({**m, "content": content})
    return out


def render(template: str, messages, *, add_generation_prompt: bool = True, **variables) -> str:
    """The prompt text for ``messages`` (``check_messages``) under a Jinja chat ``template``;
    ``variables`` (e.g. ``bos_token="<s>"``) are visible to the template."""
    from jinja2.exceptions import TemplateError

    try:
        return _compile(template).render(messages=check_messages(messages), add_generation_prompt=add_generation_prompt,
                                         **variables)
    except ChatTemplateError:
        raise
    except TemplateError as e:
        raise ChatTemplateError(f"the chat template failed on these messages: {e}") from None
