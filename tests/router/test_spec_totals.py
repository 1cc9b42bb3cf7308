"""Spec-decode counters behind the router: the replicas' counters summed on /metrics, never going down."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from sloserve.engine.async_engine import EngineStats
from sloserve.router.spec_totals import ReplicaSpecTotals
from sloserve.server.metrics import ServerMetrics
from sloserve.spec.speculation import SpecDecodeStats
from tests.server.serverkit import metric, parse_metrics


def stats(drafts: int, drafted: int, accepted: int, per_pos: list[int]) -> SpecDecodeStats:
    return SpecDecodeStats(drafts, drafted, accepted, accepted + drafts, per_pos)


def test_replica_counters_are_summed_and_a_restart_does_not_take_them_back():
    totals = ReplicaSpecTotals()
    totals.observe(0, stats(4, 12, 6, [3, 2, 1]))
    totals.observe(1, stats(2, 4, 1, [1, 0]))  # another k: positions padded
    totals.observe(1, None)  # a report without counters changes nothing
    assert totals.stats == stats(6, 16, 7, [4, 2, 1])
    totals.observe(0, stats(5, 15, 8, [4, 3, 1]))  # replica 0 counted on
    assert totals.stats == stats(7, 19, 9, [5, 3, 1])
    totals.observe(0, stats(1, 3, 1, [1, 0, 0]))  # replica 0 restarted: counting from zero again
    assert totals.stats == stats(8, 22, 10, [6, 3, 1])


def test_metrics_read_the_summed_counters_at_each_scrape():
    totals = ReplicaSpecTotals()
    front = SimpleNamespace(engine=SimpleNamespace(speculator=totals), stats=EngineStats(num_blocks=8), num_waiting=0)
    metrics = ServerMetrics(front, "m", max_model_len=64, block_size=16, engine_label="total")

    def scrape(name: str) -> float:
        return metric(parse_metrics(metrics.render().decode()), f"sloserve:spec_decode_{name}")

    assert scrape("num_drafts_total") == 0
    totals.observe(0, stats(4, 12, 6, [3, 2, 1]))
    totals.observe(1, stats(2, 4, 1, [1, 0, 0]))
    assert scrape("num_drafts_total") == 6 and scrape("num_accepted_tokens_total") == 7
    assert scrape("draft_acceptance_rate") == pytest.approx(7 / 16)
