"""Prometheus metrics of a server (``/metrics``), on ``prometheus_client``: requests, tokens, time to first token and
inter-token latency histograms, prefix-cache hits, and the KV bytes that running requests hold."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class Metrics:
    def __init__(self, engine):
        self.engine = engine
        r = self.registry = CollectorRegistry()
        self.requests = Counter("dsv4_requests", "Requests received", registry=r)
        self.finished = Counter("dsv4_request_finished", "Samples finished, by reason", ["reason"], registry=r)
        self.prompt_tokens = Counter("dsv4_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.cached_tokens = Counter("dsv4_prefix_cache_hit_tokens",
                                     "Prompt tokens resumed from the prefix cache instead of prefilled", registry=r)
        self.generation_tokens = Counter("dsv4_generation_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram("dsv4_time_to_first_token_seconds", "From arrival to a request's first token",
                              buckets=_LATENCY, registry=r)
        self.itl = Histogram("dsv4_inter_token_latency_seconds", "Between a sample's consecutive tokens",
                             buckets=_LATENCY, registry=r)
        self.e2e = Histogram("dsv4_request_latency_seconds", "From arrival to the last sample's end",
                             buckets=_LATENCY, registry=r)
        Gauge("dsv4_kv_bytes_in_use", "Decode-state bytes that running requests hold",
              registry=r).set_function(engine.kv_bytes_in_use)
        Gauge("dsv4_running_sequences", "Samples decoding now", registry=r).set_function(lambda: len(engine.running))
        Gauge("dsv4_waiting_requests", "Requests waiting for rows",
              registry=r).set_function(lambda: len(engine.waiting) + engine.incoming.qsize())
        if engine.prefix is not None:
            prefix = engine.prefix
            Gauge("dsv4_prefix_cache_memory_bytes", "Bytes of the prefix cache's memory tier",
                  registry=r).set_function(lambda: prefix.memory_used)
            Gauge("dsv4_prefix_cache_disk_bytes", "Bytes of the prefix cache's disk tier",
                  registry=r).set_function(lambda: prefix.disk_used)
            Gauge("dsv4_prefix_cache_hits", "Lookups that resumed from a cached prefix",
                  registry=r).set_function(lambda: prefix.stats.hits)
            Gauge("dsv4_prefix_cache_lookups", "Prefix-cache lookups",
                  registry=r).set_function(lambda: prefix.stats.lookups)
        self._last: dict[tuple[int, int], float] = {}  # (request, sample) -> time of its last token

    def request_started(self, req) -> None:
        self.requests.inc()

    def on_event(self, req, ev) -> None:
        now = time.perf_counter()
        n = len(ev.token_ids)
        if n:
            self.generation_tokens.inc(n)
            key = (id(req), ev.index)
            last = self._last.get(key)
            if last is None:
                if not any(k[0] == id(req) for k in self._last):
                    self.ttft.observe(now - req.arrival)
            else:
                for _ in range(n):
                    self.itl.observe((now - last) / n)
            self._last[key] = now
        if ev.finish_reason is not None:
            self.finished.labels(ev.finish_reason).inc()

    def request_done(self, req) -> None:
        self.e2e.observe(time.perf_counter() - req.arrival)
        self.prompt_tokens.inc(len(req.prompt_ids))
        self.cached_tokens.inc(req.cached_tokens)
        for key in [k for k in self._last if k[0] == id(req)]:
            del self._last[key]

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
