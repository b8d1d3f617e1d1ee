"""`GET /metrics`: Prometheus text exposition of the server and the batcher.

Request counts are counted by the app as responses go out; everything about the step loop is read
from the batcher's statistics when scraped (a collector), so the loop does no metrics work.
"""
from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
WINDOW_S = 10.0  # the "recent" rates cover the steps that ended in the last WINDOW_S seconds


class _BatcherCollector:
    def __init__(self, batcher):
        self.batcher = batcher

    def collect(self):
        b = self.batcher
        with b._cond:
            st = b.stats
            recent = [r for r in st.recent if r.t_end >= time.perf_counter() - WINDOW_S]
            queued, active, reserved = len(b.queue), len(b.active), b.reserved
            last_batch = st.recent[-1].batch if st.recent else 0
            values = dict(vars(st))
        span = (recent[-1].t_end - recent[0].t_end + recent[0].seconds) if recent else 0.0
        rgen = sum(r.generated for r in recent)
        rsec = sum(r.seconds for r in recent)

        def counter(name, doc, v):
            c = CounterMetricFamily(f"sparseferry_{name}", doc)
            c.add_metric([], v)
            return c

        def gauge(name, doc, v):
            g = GaugeMetricFamily(f"sparseferry_{name}", doc)
            g.add_metric([], v)
            return g

        yield counter("requests_finished", "requests that ran to a finish reason", values["requests_finished"])
        yield counter("requests_cancelled", "requests cancelled (client gone) before finishing", values["requests_cancelled"])
        yield counter("prompt_tokens", "prompt tokens admitted", values["prompt_tokens"])
        yield counter("generation_tokens", "tokens generated", values["generated_tokens"])
        yield counter("steps", "batched forward passes", values["steps"])
        yield counter("step_seconds", "time in batched forward passes", values["step_seconds"])
        yield counter("disk_read_bytes", "bytes of streamed layers read from disk", values["bytes_read"])
        yield counter("io_wait_seconds", "forward-pass time spent waiting for streamed layers", values["io_wait_s"])
        yield counter("time_to_first_token_seconds_sum", "sum of times from submission to first token", values["ttft_sum_s"])
        yield counter("time_to_first_token_count", "requests that got a first token", values["ttft_count"])
        yield gauge("tokens_per_second", f"tokens generated per second over the last {WINDOW_S:g} s", rgen / span if span else 0.0)
        yield gauge("bytes_read_per_token", "disk bytes read per generated token (since start)",
                    values["bytes_read"] / values["generated_tokens"] if values["generated_tokens"] else 0.0)
        yield gauge("io_wait_share", f"share of step time waiting for the disk over the last {WINDOW_S:g} s",
                    sum(r.io_wait_s for r in recent) / rsec if rsec else 0.0)
        yield gauge("batch_size", "sequences in the last step", last_batch)
        yield gauge("running_requests", "sequences in the running batch", active)
        yield gauge("queue_length", "requests waiting for admission", queued)
        yield gauge("kv_cache_reserved_bytes", "KV cache reserved by the sequences in flight", reserved)
        yield gauge("kv_cache_budget_bytes", "the KV-cache budget", b.kv_budget)


class Metrics:
    def __init__(self, batcher):
        self.registry = CollectorRegistry()
        self.registry.register(_BatcherCollector(batcher))
        self.requests = Counter("sparseferry_http_requests", "HTTP requests by endpoint and status code",
                                ["endpoint", "status"], registry=self.registry)

    def count(self, endpoint: str, status: int) -> None:
        self.requests.labels(endpoint=endpoint, status=str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
