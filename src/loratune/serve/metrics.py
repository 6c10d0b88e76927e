"""What ``GET /metrics`` reports, in Prometheus' text format (prometheus_client, one registry per server)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest

disable_created_metrics()  # the *_created series only double the output

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
ADAPTER_BUCKETS = (0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)


class ServeMetrics:
    """Counters, gauges and histograms of one server; ``adapter`` labels are the request's model name."""

    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "loratune_requests",
            "Requests answered, by endpoint, model and status",
            ["endpoint", "model", "status"],
            registry=r,
        )
        self.cancelled = Counter(
            "loratune_cancelled_sequences", "Sequences stopped early: the client went away", ["model"], registry=r
        )
        self.prompt_tokens = Counter("loratune_prompt_tokens", "Prompt tokens read", ["model"], registry=r)
        self.generated_tokens = Counter("loratune_generated_tokens", "Tokens generated", ["model"], registry=r)
        self.time_to_first_token = Histogram(
            "loratune_time_to_first_token_seconds",
            "From a request's arrival to its first token",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.request_seconds = Histogram(
            "loratune_request_duration_seconds",
            "From arrival to the last token",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_rows = Histogram(
            "loratune_batch_size", "Sequences in each decoding step", buckets=BATCH_BUCKETS, registry=r
        )
        self.batch_adapters = Histogram(
            "loratune_batch_adapters",
            "Distinct adapters in each decoding step (at most --max-loras)",
            buckets=ADAPTER_BUCKETS,
            registry=r,
        )
        self.max_loras = Gauge("loratune_max_loras", "Most distinct adapters in one batch (--max-loras)", registry=r)
        self.step_seconds = Histogram(
            "loratune_decode_step_seconds", "Time of each decoding step", buckets=LATENCY_BUCKETS, registry=r
        )
        self.queue_depth = Gauge("loratune_queue_depth", "Sequences waiting to start", registry=r)
        self.running = Gauge("loratune_running_sequences", "Sequences being prefilled or decoded", registry=r)
        self.adapters_loaded = Gauge("loratune_adapters_in_memory", "Adapters held in memory", registry=r)
        self.adapters_known = Gauge("loratune_adapters_known", "Adapters the server can serve", registry=r)

    def watch(self, engine, pool) -> None:
        """Read the gauges off the engine (its latest stats snapshot) and the adapter pool when scraped."""
        self.queue_depth.set_function(lambda: engine.stats.waiting)
        self.running.set_function(lambda: engine.stats.running)
        self.adapters_loaded.set_function(pool.in_memory)
        self.adapters_known.set_function(lambda: len(pool.listed()))
        self.max_loras.set(engine.max_adapters or 0)

    def on_step(self, rows: int, adapters: int, seconds: float) -> None:
        """``Engine``'s ``on_step``: one decoding step of ``rows`` rows and ``adapters`` distinct adapters."""
        self.batch_rows.observe(rows)
        self.batch_adapters.observe(adapters)
        self.step_seconds.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
