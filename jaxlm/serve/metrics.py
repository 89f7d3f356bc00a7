"""Prometheus metrics of a server (``prometheus-client``, one registry per app)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST  # noqa: F401  (re-exported for the app)

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    """What the engine and the HTTP layer report; ``render()`` is the /metrics body."""

    def __init__(self, engine=None):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("jaxlm_requests", "HTTP requests answered, by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("jaxlm_prompt_tokens", "Prompt tokens of accepted requests", registry=r)
        self.generated_tokens = Counter("jaxlm_generated_tokens", "Tokens generated", registry=r)
        self.queue_depth = Gauge("jaxlm_queue_depth", "Requests waiting for a slot", registry=r)
        self.slots_in_use = Gauge("jaxlm_slots_in_use", "Batch slots generating", registry=r)
        self.ttft = Histogram("jaxlm_time_to_first_token_seconds", "From submission to a choice's first token",
                              buckets=_LATENCY, registry=r)
        self.itl = Histogram("jaxlm_inter_token_latency_seconds", "Between two tokens of one choice",
                             buckets=_LATENCY, registry=r)
        self.draft_tokens = Counter("jaxlm_draft_tokens", "Tokens proposed by speculative decoding's draft",
                                    registry=r)
        self.draft_accepted = Counter("jaxlm_draft_accepted_tokens", "Draft tokens the model accepted", registry=r)
        if engine is not None:
            self.queue_depth.set_function(lambda: engine.queue_depth)
            self.slots_in_use.set_function(lambda: engine.slots_in_use)

    # the engine's hooks (called from its thread)
    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)
        self.generated_tokens.inc()

    def token_gap(self, seconds: float) -> None:
        self.itl.observe(seconds)
        self.generated_tokens.inc()

    def speculated(self, proposed: int, accepted: int) -> None:
        self.draft_tokens.inc(proposed)
        self.draft_accepted.inc(accepted)

    def render(self) -> bytes:
        return generate_latest(self.registry)
