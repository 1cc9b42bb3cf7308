"""Prometheus metrics of one server (`/metrics`): vLLM's series, meanings and buckets, named `sloserve:*`.

Colons are legal in Prometheus metric names (by convention kept for recording rules, but vLLM uses
them and dashboards expect that shape); prometheus-client writes them unchanged in the text format,
and appends `_total` to counters itself. With `--metrics-compat vllm` every series that vLLM also has
is exported a second time under its `vllm:` name, so dashboards and autoscalers built on vLLM work.

Request-level series are observed when a request ends (vLLM observes TTFT and inter-token gaps as
tokens arrive): the sums and counts agree with vLLM's once requests finish.
"""
from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from sloserve.engine.async_engine import AsyncLLMEngine
from sloserve.engine.executor import Executor
from sloserve.engine.scheduler import SchedulerOutput
from sloserve.request import RequestOutput

PREFIX = "sloserve:"
COMPAT_PREFIXES = {"none": None, "vllm": "vllm:"}
# vLLM's bucket layouts (vllm/v1/metrics/loggers.py).
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                 40.0, 80.0, 160.0, 640.0, 2560.0)
_ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                            240.0, 480.0, 960.0, 1920.0, 7680.0)
_ITERATION_TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
_RATIO_BUCKETS = (0.25, 0.5, 0.67, 0.8, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0, 4.0)
# sloserve's own series: no vLLM counterpart, so never exported under vLLM's prefix.
_SLOSERVE_ONLY = {"request_rejected", "kv_cache_used_blocks", "kv_cache_total_blocks", "step_time_prediction_error",
                  "predicted_time_to_first_token_seconds", "time_to_first_token_over_predicted"}


CONTENT_TYPE = CONTENT_TYPE_LATEST


def one_two_five_buckets(limit: int) -> tuple[int, ...]:
    """1, 2, 5, 10, 20, 50, ... up to `limit` (vLLM's build_1_2_5_buckets for token counts)."""
    out, exponent = [], 0
    while True:
        for mantissa in (1, 2, 5):
            value = mantissa * 10**exponent
            if value > limit:
                return tuple(out)
            out.append(value)
        exponent += 1


class _EngineStateCollector:
    """Gauges read at scrape time from the stats the step loop snapshots between steps."""

    def __init__(self, engine: AsyncLLMEngine, labels: dict[str, str], block_size: int) -> None:
        self.engine = engine
        self.labels = labels
        self.block_size = block_size

    def _rows(self):
        """(engine label, stats, waiting) per engine: one here, or each replica and their total."""
        replica_stats = getattr(self.engine, "replica_stats", None)
        if replica_stats is None:
            return [(self.labels["engine"], self.engine.stats, self.engine.num_waiting)]
        return [*replica_stats(), ("total", self.engine.stats, self.engine.num_waiting)]

    def collect(self):
        rows = self._rows()
        names = list(self.labels)

        def family(kind, name: str, doc: str, value, **extra: str):
            metric = kind(PREFIX + name, doc, labels=[*names, *extra])
            for engine, stats, waiting in rows:
                values = {**self.labels, "engine": engine}
                metric.add_metric([*values.values(), *extra.values()], value(stats, waiting))
            return metric

        yield family(GaugeMetricFamily, "num_requests_running", "Number of requests in model execution batches.",
                     lambda s, w: s.num_running)
        yield family(GaugeMetricFamily, "num_requests_waiting", "Number of requests waiting to be processed (queued "
                     "in the engine, or accepted and not yet handed to it).", lambda s, w: w)
        yield family(GaugeMetricFamily, "kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.",
                     lambda s, w: s.num_used_blocks / s.num_blocks if s.num_blocks else 0.0)
        yield family(GaugeMetricFamily, "kv_cache_used_blocks", "KV-cache blocks held by requests.",
                     lambda s, w: s.num_used_blocks)
        yield family(GaugeMetricFamily, "kv_cache_total_blocks", "KV-cache blocks in all.", lambda s, w: s.num_blocks)
        # vLLM's info gauge: value 1, the cache configuration in its labels (its label names).
        info = GaugeMetricFamily(PREFIX + "cache_config_info", "Information of the LLMEngine CacheConfig",
                                 labels=[*names, "block_size", "num_gpu_blocks"])
        for engine, stats, _ in rows:
            info.add_metric([*{**self.labels, "engine": engine}.values(), str(self.block_size), str(stats.num_blocks)], 1.0)
        yield info
        yield family(GaugeMetricFamily, "step_time_prediction_error", "Median |predicted - measured| / measured step "
                     "time over recent steps (each predicted before it ran; engine=total: the worst replica's).",
                     lambda s, w: s.step_time_error)
        # vLLM's prefix-cache pair, in tokens: hit rate = hits / queries over any window.
        yield family(CounterMetricFamily, "prefix_cache_queries", "Prefix cache queries, in terms of number of "
                     "queried tokens.", lambda s, w: s.prefix_cache_queries)
        yield family(CounterMetricFamily, "prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.",
                     lambda s, w: s.prefix_cache_hits)


class _Renamed:
    """Re-exports every vLLM-shared family of a registry under another prefix."""

    def __init__(self, source: CollectorRegistry, prefix: str) -> None:
        self.source = source
        self.prefix = prefix

    def collect(self):
        for family in self.source.collect():
            short = family.name.removeprefix(PREFIX)
            if short in _SLOSERVE_ONLY:
                continue
            renamed = Metric(self.prefix + short, family.documentation, family.type, family.unit)
            for sample in family.samples:
                renamed.samples.append(sample._replace(name=self.prefix + sample.name.removeprefix(PREFIX)))
            yield renamed


class _SpecDecodeCollector:
    """vLLM's spec-decode counters (drafts, draft/accepted/emitted tokens, accepted per position), read at scrape time."""

    def __init__(self, speculator, labels: dict[str, str]) -> None:
        self.speculator, self.labels = speculator, labels

    def collect(self):
        # Its `stats` read at each scrape: behind the router they are summed from the replicas' latest reports.
        st, names, values = self.speculator.stats, list(self.labels), list(self.labels.values())
        for name, doc, value in (
            ("num_drafts", "Verifications: request-steps that verified drafts.", st.num_drafts),
            ("num_draft_tokens", "Draft tokens proposed and verified.", st.num_draft_tokens),
            ("num_accepted_tokens", "Draft tokens accepted.", st.num_accepted_tokens),
            ("num_emitted_tokens", "Tokens emitted by verifications (accepted drafts plus the target's own).", st.num_emitted_tokens),
        ):
            family = CounterMetricFamily(f"{PREFIX}spec_decode_{name}", doc, labels=names)
            family.add_metric(values, value)
            yield family
        per_pos = CounterMetricFamily(f"{PREFIX}spec_decode_num_accepted_tokens_per_pos", "Accepted drafts by position.",
                                      labels=[*names, "position"])
        for pos, value in enumerate(st.accepted_per_pos):
            per_pos.add_metric([*values, str(pos)], value)
        yield per_pos
        rate = GaugeMetricFamily(f"{PREFIX}spec_decode_draft_acceptance_rate", "Accepted over drafted tokens.", labels=names)
        rate.add_metric(values, st.acceptance_rate)
        yield rate


class ServerMetrics:
    """One registry per server (never prometheus-client's global one), so servers in one process do not mix."""

    def __init__(self, engine: AsyncLLMEngine, model_name: str, *, max_model_len: int, block_size: int,
                 compat: str = "none", engine_label: str = "0") -> None:
        if compat not in COMPAT_PREFIXES:
            raise ValueError(f"unknown metrics compat {compat!r}; choose from {', '.join(COMPAT_PREFIXES)}")
        self.registry = CollectorRegistry()
        # vLLM's labels; behind a router, request series are the server's whole ("total"), engine state per replica.
        labels = {"model_name": model_name, "engine": engine_label}
        self.registry.register(_EngineStateCollector(engine, labels, block_size))
        speculator = getattr(engine.engine, "speculator", None)
        if speculator is not None:
            self.registry.register(_SpecDecodeCollector(speculator, labels))
        self._compat = None
        if COMPAT_PREFIXES[compat] is not None:
            self._compat = CollectorRegistry()
            self._compat.register(_Renamed(self.registry, COMPAT_PREFIXES[compat]))
        self._labels = labels
        r = self.registry

        def counter(name: str, doc: str, extra: tuple[str, ...] = ()) -> Counter:
            return Counter(PREFIX + name, doc, [*labels, *extra], registry=r)

        def histogram(name: str, doc: str, buckets) -> Histogram:
            return Histogram(PREFIX + name, doc, list(labels), buckets=buckets, registry=r).labels(**labels)

        self._success = counter("request_success", "Count of processed requests, by finish reason (stop, length, "
                                "abort; error: failed by an engine fault).", ("finished_reason",))
        self._rejected = counter("request_rejected", "Requests refused before reaching the engine, by reason.", ("reason",))
        self._prompt_tokens = counter("prompt_tokens", "Number of prompt tokens of ended requests.").labels(**labels)
        self._generation_tokens = counter("generation_tokens", "Number of generation tokens processed.").labels(**labels)
        self._preemptions = counter("num_preemptions", "Cumulative number of preemption from the engine.").labels(**labels)
        token_buckets = one_two_five_buckets(max_model_len)
        self.request_prompt_tokens = histogram("request_prompt_tokens", "Number of prefill tokens processed.", token_buckets)
        self.request_generation_tokens = histogram("request_generation_tokens", "Number of generation tokens processed.", token_buckets)
        self.iteration_tokens = histogram("iteration_tokens_total", "Histogram of number of tokens per engine_step.",
                                          _ITERATION_TOKEN_BUCKETS)
        self.ttft = histogram("time_to_first_token_seconds", "Histogram of time to first token in seconds.", _TTFT_BUCKETS)
        self.itl = histogram("inter_token_latency_seconds", "Histogram of inter-token latency in seconds (every gap "
                             "between a request's consecutive token steps).", _ITL_BUCKETS)
        # vLLM's older name for the same per-gap series (deprecated there in 0.11, still on many dashboards).
        self.tpot_gaps = histogram("time_per_output_token_seconds", "Histogram of time per output token in seconds "
                                   "(every inter-token gap; same as inter_token_latency_seconds).", _ITL_BUCKETS)
        self.request_tpot = histogram("request_time_per_output_token_seconds", "Histogram of time_per_output_token_"
                                      "seconds per request: (last - first token) / (tokens - 1), requests with > 1 token.",
                                      _ITL_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.", _REQUEST_LATENCY_BUCKETS)
        self.queue = histogram("request_queue_time_seconds", "Histogram of time spent in WAITING phase for request.",
                               _REQUEST_LATENCY_BUCKETS)
        self.inference = histogram("request_inference_time_seconds", "Histogram of time spent in RUNNING phase for "
                                   "request (first scheduled to last token).", _REQUEST_LATENCY_BUCKETS)
        self.prefill = histogram("request_prefill_time_seconds", "Histogram of time spent in PREFILL phase for request "
                                 "(first scheduled to first token).", _REQUEST_LATENCY_BUCKETS)
        self.decode = histogram("request_decode_time_seconds", "Histogram of time spent in DECODE phase for request "
                                "(first to last token).", _REQUEST_LATENCY_BUCKETS)
        # --admission slo: the TTFT predicted at arrival, and how the actual one compared (sloserve's own).
        self.ttft_predicted = histogram("predicted_time_to_first_token_seconds",
                                        "TTFT predicted at admission (--admission slo).", _TTFT_BUCKETS)
        self.ttft_ratio = histogram("time_to_first_token_over_predicted",
                                    "Per request: actual TTFT / TTFT predicted at admission.", _RATIO_BUCKETS)
        self._predicted: dict[str, float] = {}

    def predicted_ttft(self, request_id: str, seconds: float) -> None:
        self.ttft_predicted.observe(seconds)
        self._predicted[request_id] = seconds

    def observe_steps(self, executor: Executor) -> Executor:
        """Wrap an executor so each step's batched tokens and preemptions are counted as it runs."""
        return _StepObserver(executor, self)

    def on_step(self, plan: SchedulerOutput) -> None:
        self.iteration_tokens.observe(plan.num_batched_tokens)
        if plan.preempted_request_ids:
            self._preemptions.inc(len(plan.preempted_request_ids))

    def on_finished(self, out: RequestOutput, error: BaseException | None) -> None:
        """The async engine's hook: called once for every accepted request when it ends."""
        predicted = self._predicted.pop(out.request_id, None)
        completion = out.outputs[0]
        reason = "error" if error is not None else (completion.finish_reason or "abort")
        self._success.labels(finished_reason=reason, **self._labels).inc()
        self._prompt_tokens.inc(len(out.prompt_token_ids))
        self.request_prompt_tokens.observe(len(out.prompt_token_ids))
        times = completion.token_times  # latencies follow the first completion; token counts take all n
        generated = sum(len(c.token_times) for c in out.outputs)
        self._generation_tokens.inc(generated)
        # A shift here also shows inputs crafted to inflate output (the verbose-input latency attack).
        self.request_generation_tokens.observe(generated)
        if out.finished_time is not None:
            self.e2e.observe(out.finished_time - out.arrival_time)
        scheduled = out.first_scheduled_time
        if scheduled is not None:
            self.queue.observe(scheduled - out.arrival_time)
        if not times:
            return
        self.ttft.observe(times[0] - out.arrival_time)
        if predicted:
            self.ttft_ratio.observe((times[0] - out.arrival_time) / predicted)
        for earlier, later in zip(times, times[1:]):
            if later > earlier:  # tokens of one step arrive together: one gap per step, as vLLM counts
                self.itl.observe(later - earlier)
                self.tpot_gaps.observe(later - earlier)
        if len(times) > 1:
            self.request_tpot.observe((times[-1] - times[0]) / (len(times) - 1))
        self.decode.observe(times[-1] - times[0])
        if scheduled is not None:
            self.prefill.observe(times[0] - scheduled)
            self.inference.observe(times[-1] - scheduled)

    def rejected(self, reason: str) -> None:
        self._rejected.labels(reason=reason, **self._labels).inc()

    def render(self) -> bytes:
        text = generate_latest(self.registry)
        return text if self._compat is None else text + generate_latest(self._compat)


class _StepObserver:
    """An Executor that counts each plan it runs, then hands it to the real one."""

    def __init__(self, inner: Executor, metrics: ServerMetrics) -> None:
        self.inner = inner
        self.metrics = metrics
        self.num_kv_blocks = inner.num_kv_blocks

    def execute(self, plan: SchedulerOutput) -> list[list[int]]:
        self.metrics.on_step(plan)
        return self.inner.execute(plan)

    def __getattr__(self, name: str):
        # Everything else (the model, the sampler, ...) is the wrapped executor's.
        return getattr(self.inner, name)
