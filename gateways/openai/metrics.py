"""Prometheus metrics of one gateway, in a registry the app owns (never the process-wide one)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

_TTFT_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_ITL_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class GatewayMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "mesh_gateway_requests",
            "HTTP requests answered, by route, method and status",
            ("route", "method", "status"),
            registry=registry,
        )
        self.errors = Counter(
            "mesh_gateway_errors",
            "HTTP requests answered with an error (status >= 400) or ended by an error event",
            ("route", "status", "type"),
            registry=registry,
        )
        self.in_flight = Gauge(
            "mesh_gateway_generations_in_flight",
            "completion requests being generated now",
            registry=registry,
        )
        self.ttft = Histogram(
            "mesh_gateway_time_to_first_token_seconds",
            "from the request's arrival to its first token",
            ("model",),
            buckets=_TTFT_BUCKETS,
            registry=registry,
        )
        self.itl = Histogram(
            "mesh_gateway_inter_token_latency_seconds",
            "between two consecutive tokens of one choice (a delta of k tokens counts k gaps of 1/k)",
            ("model",),
            buckets=_ITL_BUCKETS,
            registry=registry,
        )
        self.generated_tokens = Counter(
            "mesh_gateway_generated_tokens",
            "completion tokens generated",
            ("model",),
            registry=registry,
        )
        self.prompt_tokens = Counter(
            "mesh_gateway_prompt_tokens",
            "prompt tokens processed",
            ("model",),
            registry=registry,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
