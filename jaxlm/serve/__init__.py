"""Serving: ``Engine`` (continuous batching over a loaded ``LM``, no HTTP needed) and, in
``jaxlm.serve.app``, ``create_app`` (the OpenAI-compatible HTTP API over an engine; needs the
``serve`` extra)."""

from jaxlm.serve.engine import Engine, Event, QueueFull

__all__ = ["Engine", "Event", "QueueFull"]
