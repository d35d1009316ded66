"""Prometheus metrics of a serving engine, in the Prometheus text format (prometheus_client):
`GET /metrics` on the HTTP API's port, or on `serve --metrics HOST:PORT` (docs/metrics.md).

Events (a request finishing, a token arriving) are counted as they happen, in the engine; counters
the engine keeps anyway (tokens, restarts) and the state of the moment (queue, batch, KV cache, the
CPU pool's counters) are read at each scrape, so nothing is counted twice.
"""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, SummaryMetricFamily

# From a short prompt on a GPU (tens of ms) to a long one streamed through PCIe (minutes).
TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120, 300, 600)
# A decode step: milliseconds for a small model, around a second for the largest on the CPU pool.
ITL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2.5, 5)


def cpu_share(family, pool: list[dict]) -> float | None:
    """The fraction of the routed choices decode offered the CPU pool that it ran: 1 for pure_cpu,
    1 - the hot set's hit rate for hcs_hybrid. Every pool process is offered each call's tokens x
    top-k choices and runs those of its block; None before any call."""
    moe = [i for i in range(family.num_layers) if family.is_moe(i)]
    offered = pool[0]["tokens"] * family.experts(moe[0]).top_k if pool and moe else 0
    return sum(p["pairs"] for p in pool) / offered if offered else None


class Metrics:
    """One engine's registry; the engine calls `finished` as a request ends and observes `ttft` and
    `itl` as its tokens arrive."""

    def __init__(self, engine):
        self.engine = engine
        self.registry = CollectorRegistry()
        self.requests = Counter("krasis_requests", "Requests ended, by front end (zmq, http) and finish reason "
                                "(length, stop, eos, cancelled, error).", ["frontend", "finish_reason"],
                                registry=self.registry)
        self.ttft = Histogram("krasis_time_to_first_token_seconds", "From a request's arrival to its first token.",
                              buckets=TTFT_BUCKETS, registry=self.registry)
        self.itl = Histogram("krasis_inter_token_latency_seconds", "Between a request's consecutive tokens.",
                             buckets=ITL_BUCKETS, registry=self.registry)
        self._stats: dict = {}
        self.registry.register(self)

    def finished(self, frontend: str, reason: str) -> None:
        self.requests.labels(frontend, reason).inc()

    def collect(self):
        """The families read from the engine's stats at scrape time (`render` sets them)."""
        s, e = self._stats, self.engine
        if not s:
            return
        for name, key, text in [("krasis_prompt_tokens", "prompt_tokens", "Prompt tokens prefilled."),
                                ("krasis_generated_tokens", "generated_tokens", "Tokens generated."),
                                ("krasis_worker_restarts", "restarts", "Restarts of the worker group after a worker died."),
                                ("krasis_worker_restart_seconds", "restart_s", "Seconds the service spent restarting its "
                                 "workers, from a death seen to the new group ready."),
                                ("krasis_replays", "replays", "Requests prefilled again (prompt and tokens so far) after a worker fault.")]:
            yield CounterMetricFamily(name, text, value=s[key])
        yield GaugeMetricFamily("krasis_queue_length", "Requests waiting to be prefilled.", value=s["waiting"])
        yield GaugeMetricFamily("krasis_running_requests", "Requests prefilled and decoding.", value=s["running"])
        held = sum(len(r.prompt_ids) + len(r.generated) for r in list(e.running.values()))
        yield GaugeMetricFamily("krasis_kv_cache_usage_ratio", "Tokens in the KV cache of running requests over the "
                                "most the schedule holds (--max-batch x --max-context).",
                                value=held / (e.opts.max_batch * e.opts.max_context))
        pool = s.get("cpu_pool", [])
        layer = SummaryMetricFamily("krasis_cpu_pool_layer_seconds", "The CPU pool's expert kernel time per layer call, "
                                    "by pool process (rate of _sum over rate of _count: seconds per layer).",
                                    labels=["node"])
        for p in pool:
            layer.add_metric([str(p["node"])], count_value=p["calls"], sum_value=p["kernel_s"])
        yield layer
        share = cpu_share(e.family, pool)
        if share is not None:
            yield GaugeMetricFamily("krasis_cpu_pool_routed_share", "The fraction of decode's routed choices that "
                                    "the CPU pool ran, since start.", value=share)
            yield GaugeMetricFamily("krasis_hot_expert_hit_rate", "The fraction of decode's routed choices that "
                                    "experts resident on the GPU ran (1 - the CPU pool's share), since start.",
                                    value=1.0 - share)

    async def render(self) -> bytes:
        self._stats = (await self.engine.stats_reply()).stats
        return generate_latest(self.registry)

    async def handler(self, request: web.Request) -> web.Response:
        return web.Response(body=await self.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})


class MetricsServer:
    """/metrics on a port of its own, for a serve without the HTTP API (`--metrics HOST:PORT`)."""

    def __init__(self, metrics: Metrics):
        app = web.Application()
        app.router.add_get("/metrics", metrics.handler)
        self.runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)

    async def start(self, host: str, port: int) -> None:
        await self.runner.setup()
        await web.TCPSite(self.runner, host, port).start()

    async def stop(self) -> None:
        await self.runner.cleanup()
