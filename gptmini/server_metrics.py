"""The server's Prometheus metrics: one registry per app, fed by the engine's hooks (`EngineMetrics`)."""

from __future__ import annotations

from collections.abc import Callable

# ---- metrics --------------------------------------------------------------------------------------------------


class Metrics:
    """Prometheus metrics of one app (its own registry, so several apps in one process do not clash)."""

    def __init__(self, engine_state: Callable[[], tuple[int, int]]) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        r = self.registry
        running = Gauge("gptmini_requests_running", "Requests decoding now (rows of the batch)", registry=r)
        running.set_function(lambda: engine_state()[0])
        waiting = Gauge("gptmini_requests_waiting", "Requests queued for a free row", registry=r)
        waiting.set_function(lambda: engine_state()[1])
        self.prompt_tokens = Counter("gptmini_prompt_tokens", "Prompt tokens prefilled", registry=r)
        self.generation_tokens = Counter("gptmini_generation_tokens", "Tokens generated", registry=r)
        latency = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
        self.ttft = Histogram(
            "gptmini_time_to_first_token_seconds",
            "Request arrival to its first token",
            buckets=latency,
            registry=r,
        )
        self.itl = Histogram(
            "gptmini_inter_token_latency_seconds",
            "Time between a request's tokens",
            buckets=latency,
            registry=r,
        )
        self.queue_time = Histogram(
            "gptmini_queue_time_seconds", "Request arrival to its prefill", buckets=latency, registry=r
        )
        self.batch = Histogram(
            "gptmini_decode_batch_size",
            "Requests in each decode step",
            buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=r,
        )
        self.finished_total = Counter(
            "gptmini_requests_finished", "Requests finished, by reason", ["reason"], registry=r
        )
        self.cancelled = Counter(
            "gptmini_requests_cancelled", "Requests cancelled (client gone or stopped)", registry=r
        )
        self.rejected = Counter(
            "gptmini_requests_rejected", "Requests refused, by reason", ["reason"], registry=r
        )
        self.lookup_drafted = Counter(
            "gptmini_lookup_draft_tokens", "Prompt-lookup draft tokens verified", registry=r
        )
        self.lookup_accepted = Counter(
            "gptmini_lookup_accepted_tokens", "Prompt-lookup draft tokens kept", registry=r
        )

    # EngineMetrics hooks (called from the engine thread)
    def admitted(self, prompt_tokens: int, waited_s: float) -> None:
        self.prompt_tokens.inc(prompt_tokens)
        self.queue_time.observe(waited_s)

    def token(self, first: bool, seconds: float) -> None:
        self.generation_tokens.inc()
        (self.ttft if first else self.itl).observe(seconds)

    def step(self, batch_size: int, seconds: float) -> None:
        self.batch.observe(batch_size)

    def finished(self, reason: str) -> None:
        self.finished_total.labels(reason).inc()
        if reason == "cancelled":
            self.cancelled.inc()

    def lookup(self, drafted: int, accepted: int) -> None:
        self.lookup_drafted.inc(drafted)
        self.lookup_accepted.inc(accepted)
