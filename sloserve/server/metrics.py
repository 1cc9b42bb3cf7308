"""Prometheus metrics of one server (`/metrics`), named `sloserve:*` after vLLM's `vllm:*`."""
from __future__ import annotations

# Colons are legal in Prometheus metric names (by convention kept for recording rules, but vLLM
# uses them and dashboards expect that shape); prometheus-client writes them unchanged in the
# text format, and appends `_total` to counters itself.

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from sloserve.engine.async_engine import AsyncLLMEngine
from sloserve.request import RequestOutput

_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0)
_RATIO_BUCKETS = (0.25, 0.5, 0.67, 0.8, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0, 4.0)
_LATENCY_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0, 300.0)

_OUTPUT_LENGTH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class _EngineStateCollector:
    """Gauges read at scrape time from the stats the step loop snapshots between steps."""

    def __init__(self, engine: AsyncLLMEngine) -> None:
        self.engine = engine

    def collect(self):
        stats = self.engine.stats
        yield GaugeMetricFamily("sloserve:num_requests_running", "Requests in the engine's running batch.", value=stats.num_running)
        yield GaugeMetricFamily(
            "sloserve:num_requests_waiting",
            "Requests waiting for the engine (queued in it, or accepted and not yet handed to it).",
            value=self.engine.num_waiting,
        )
        yield GaugeMetricFamily("sloserve:kv_cache_used_blocks", "KV-cache blocks held by requests.", value=stats.num_used_blocks)
        yield GaugeMetricFamily("sloserve:kv_cache_total_blocks", "KV-cache blocks in all.", value=stats.num_blocks)
        usage = stats.num_used_blocks / stats.num_blocks if stats.num_blocks else 0.0
        yield GaugeMetricFamily("sloserve:kv_cache_usage_perc", "Share of KV-cache blocks in use (0-1).", value=usage)
        yield GaugeMetricFamily(
            "sloserve:step_time_prediction_error",
            "Median |predicted - measured| / measured step time over recent steps (each predicted before it ran).",
            value=stats.step_time_error,
        )


class _SpecDecodeCollector:
    """vLLM's spec-decode counters (drafts, draft/accepted/emitted tokens, accepted per position), read at scrape time."""

    def __init__(self, stats, model_name: str) -> None:
        self.stats, self.model_name = stats, model_name

    def collect(self):
        st, labels = self.stats, [self.model_name]
        for name, doc, value in (
            ("num_drafts", "Verifications: request-steps that verified drafts.", st.num_drafts),
            ("num_draft_tokens", "Draft tokens proposed and verified.", st.num_draft_tokens),
            ("num_accepted_tokens", "Draft tokens accepted.", st.num_accepted_tokens),
            ("num_emitted_tokens", "Tokens emitted by verifications (accepted drafts plus the target's own).", st.num_emitted_tokens),
        ):
            family = CounterMetricFamily(f"sloserve:spec_decode_{name}", doc, labels=["model_name"])
            family.add_metric(labels, value)
            yield family
        per_pos = CounterMetricFamily("sloserve:spec_decode_num_accepted_tokens_per_pos", "Accepted drafts by position.",
                                      labels=["model_name", "position"])
        for pos, value in enumerate(st.accepted_per_pos):
            per_pos.add_metric([self.model_name, str(pos)], value)
        yield per_pos
        yield GaugeMetricFamily("sloserve:spec_decode_draft_acceptance_rate", "Accepted over drafted tokens.",
                                value=st.acceptance_rate)


class ServerMetrics:
    """One registry per server (never prometheus-client's global one), so servers in one process do not mix."""

    def __init__(self, engine: AsyncLLMEngine, model_name: str) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_EngineStateCollector(engine))
        speculator = getattr(engine.engine, "speculator", None)
        if speculator is not None:
            self.registry.register(_SpecDecodeCollector(speculator.stats, model_name))
        labels = {"model_name": model_name}
        r = self.registry

        def counter(name: str, doc: str, extra: tuple[str, ...] = ()) -> Counter:
            return Counter(name, doc, ["model_name", *extra], registry=r)

        def histogram(name: str, doc: str, buckets) -> Histogram:
            return Histogram(name, doc, ["model_name"], buckets=buckets, registry=r).labels(**labels)

        self._labels = labels
        self._success = counter("sloserve:request_success", "Requests that ended, by finish reason (stop, length, abort, error).", ("finished_reason",))
        self._rejected = counter("sloserve:request_rejected", "Requests refused before reaching the engine, by reason.", ("reason",))
        self._prompt_tokens = counter("sloserve:prompt_tokens", "Prompt tokens of requests that ended.").labels(**labels)
        self._generation_tokens = counter("sloserve:generation_tokens", "Tokens generated.").labels(**labels)
        self.ttft = histogram("sloserve:time_to_first_token_seconds", "Arrival to first output token.", _TTFT_BUCKETS)
        self.tpot = histogram(
            "sloserve:time_per_output_token_seconds",
            "Per request: (last token - first token) / (output tokens - 1), for requests with more than one token.",
            _TPOT_BUCKETS,
        )
        self.e2e = histogram("sloserve:e2e_request_latency_seconds", "Arrival to the end of the request.", _LATENCY_BUCKETS)
        self.queue = histogram("sloserve:request_queue_time_seconds", "Arrival to first scheduled.", _LATENCY_BUCKETS)
        # A shift here shows inputs crafted to inflate output (the verbose-input latency attack).
        self.output_length = histogram("sloserve:request_generation_tokens", "Output tokens per ended request.",
                                       _OUTPUT_LENGTH_BUCKETS)
        # --admission slo: the TTFT predicted at arrival, and how the actual one compared.
        self.ttft_predicted = histogram("sloserve:predicted_time_to_first_token_seconds",
                                        "TTFT predicted at admission (--admission slo).", _TTFT_BUCKETS)
        self.ttft_ratio = histogram("sloserve:time_to_first_token_over_predicted",
                                    "Per request: actual TTFT / TTFT predicted at admission.", _RATIO_BUCKETS)
        self._predicted: dict[str, float] = {}

    def predicted_ttft(self, request_id: str, seconds: float) -> None:
        self.ttft_predicted.observe(seconds)
        self._predicted[request_id] = seconds

    def on_finished(self, out: RequestOutput, error: BaseException | None) -> None:
        """The async engine's hook: called once for every accepted request when it ends."""
        predicted = self._predicted.pop(out.request_id, None)
        reason = "error" if error is not None else (out.finish_reason or "abort")
        self._success.labels(finished_reason=reason, **self._labels).inc()
        self._prompt_tokens.inc(len(out.prompt_token_ids))
        times = out.token_times
        self._generation_tokens.inc(len(times))
        self.output_length.observe(len(times))
        if times:
            self.ttft.observe(times[0] - out.arrival_time)
            if predicted:
                self.ttft_ratio.observe((times[0] - out.arrival_time) / predicted)
        if len(times) > 1:
            self.tpot.observe((times[-1] - times[0]) / (len(times) - 1))
        if out.finished_time is not None:
            self.e2e.observe(out.finished_time - out.arrival_time)
        if out.first_scheduled_time is not None:
            self.queue.observe(out.first_scheduled_time - out.arrival_time)

    def rejected(self, reason: str) -> None:
        self._rejected.labels(reason=reason, **self._labels).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
