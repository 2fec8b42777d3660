"""Prometheus metrics of one server, named after vLLM's with the `cachetalk:` prefix.

Each server keeps its own registry, so several apps can live in one process (tests,
an in-process broker) without clashing names.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

CONTENT_TYPE = CONTENT_TYPE_LATEST

# Latency buckets in seconds, from a few milliseconds (a short prompt on a GPU) to
# minutes (a long prompt plus a long answer on a CPU).
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)

# Request paths counted under their own label. Other paths are counted as "other", so
# that arbitrary URLs cannot grow the number of series.
KNOWN_PATHS = frozenset({
    "/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions", "/v1/tokenize",
    "/v1/tokenizer", "/v1/kv/prefill", "/v1/kv/generate",
})


class ServerMetrics:
    """The metrics of one server serving `model`."""

    def __init__(self, model: str, known_paths: frozenset[str] = KNOWN_PATHS):
        self.model = model
        self.known_paths = known_paths
        self.registry = CollectorRegistry()
        labels = ["model"]
        self.requests = Counter("cachetalk:requests", "HTTP requests by path and status code",
                                ["model", "path", "status"], registry=self.registry)
        self.request_success = Counter("cachetalk:request_success", "Finished generations by finish reason",
                                       ["model", "finished_reason"], registry=self.registry)
        self.prompt_tokens = Counter("cachetalk:prompt_tokens", "Prompt tokens of generation requests",
                                     labels, registry=self.registry)
        self.generation_tokens = Counter("cachetalk:generation_tokens", "Generated tokens",
                                         labels, registry=self.registry)
        self.kv_exported_tokens = Counter("cachetalk:kv_exported_tokens", "Tokens whose KV cache was exported",
                                          labels, registry=self.registry)
        self.kv_imported_tokens = Counter("cachetalk:kv_imported_tokens", "Tokens whose KV cache was imported",
                                          labels, registry=self.registry)
        self.running = Gauge("cachetalk:num_requests_running", "Decoding threads at work, including those of cancelled requests until they stop",
                             labels, registry=self.registry)
        self.decode_batch_size = Histogram("cachetalk:decode_batch_size", "Requests per batched decode step",
                                           labels, buckets=BATCH_BUCKETS, registry=self.registry)
        self.ttft = Histogram("cachetalk:time_to_first_token_seconds", "Time from request to first token",
                              labels, buckets=LATENCY_BUCKETS, registry=self.registry)
        self.e2e = Histogram("cachetalk:e2e_request_latency_seconds", "Time from request to last token",
                             labels, buckets=LATENCY_BUCKETS, registry=self.registry)
        self.kv_prefill = Histogram("cachetalk:kv_prefill_seconds", "Prefill time of KV cache exports",
                                    labels, buckets=LATENCY_BUCKETS, registry=self.registry)

    def count_request(self, method: str, path: str, status: int, seconds: float) -> None:
        label = path if path in self.known_paths else "other"
        self.requests.labels(self.model, label, str(status)).inc()

    def record_generation(self, prompt_tokens: int, completion_tokens: int, finish_reason: str,
                          ttft: float | None, e2e: float) -> None:
        self.prompt_tokens.labels(self.model).inc(prompt_tokens)
        self.generation_tokens.labels(self.model).inc(completion_tokens)
        self.request_success.labels(self.model, finish_reason).inc()
        if ttft is not None:
            self.ttft.labels(self.model).observe(ttft)
        self.e2e.labels(self.model).observe(e2e)

    def render(self) -> bytes:
        return generate_latest(self.registry)
