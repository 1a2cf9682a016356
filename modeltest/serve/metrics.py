"""Prometheus metrics of the server (prometheus_client, in a registry of its own)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class ServerMetrics:
    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "modeltest_requests", "Chat completion requests by HTTP status code", ["code"], registry=r
        )
        self.prompt_tokens = Counter("modeltest_prompt_tokens", "Prompt tokens (vision tokens included)", registry=r)
        self.generation_tokens = Counter("modeltest_generation_tokens", "Generated tokens", registry=r)
        self.ttft = Histogram(
            "modeltest_time_to_first_token_seconds",
            "Request arrival to its first token",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.latency = Histogram(
            "modeltest_e2e_request_latency_seconds",
            "Request arrival to its last token",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.running = Gauge("modeltest_num_requests_running", "Requests decoding in the engine", registry=r)
        self.waiting = Gauge(
            "modeltest_num_requests_waiting", "Requests waiting for a batch slot or KV blocks", registry=r
        )
        self.kv_used = Gauge("modeltest_kv_cache_blocks_used", "KV cache blocks held by requests", registry=r)
        self.kv_free = Gauge("modeltest_kv_cache_blocks_free", "KV cache blocks free", registry=r)
        # Reuse, as counters (vLLM's names where it has one): hit rate = hits / queries.
        self.reuse = {
            "prefix_cache_queries": Counter(
                "modeltest_prefix_cache_queries", "Prompt tokens to prefill at admissions", registry=r
            ),
            "prefix_cache_hits": Counter(
                "modeltest_prefix_cache_hits", "Of those, tokens found in the prefix cache", registry=r
            ),
            "vision_cache_hits": Counter(
                "modeltest_vision_cache_hits", "Media whose vision embeddings were cached", registry=r
            ),
            "vision_cache_misses": Counter(
                "modeltest_vision_cache_misses", "Media that ran the vision tower", registry=r
            ),
            "preemptions": Counter(
                "modeltest_num_preemptions", "Sequences preempted when KV blocks ran out", registry=r
            ),
        }
        self._seen = {k: 0 for k in self.reuse}

    def render(self, snapshot: dict) -> bytes:
        self.running.set(snapshot["running"])
        self.waiting.set(snapshot["waiting"])
        self.kv_used.set(snapshot["kv_blocks_used"])
        self.kv_free.set(snapshot["kv_blocks_free"])
        for k, counter in self.reuse.items():  # the engine's totals -> counter increments
            counter.inc(max(0, snapshot.get(k, 0) - self._seen[k]))
            self._seen[k] = max(self._seen[k], snapshot.get(k, 0))
        return generate_latest(self.registry)
