"""Metric math on hand-built records: TTFT, TPOT, ITL, E2E, throughput, attainment, goodput."""
import math

import pytest

from sloserve.bench.metrics import request_metrics, stats, summarize
from sloserve.bench.records import RequestRecord
from sloserve.bench.slo import SLO


def rec(i, send, times, out, chunk_tokens=None, error=None, prompt_len=10, prompt_tokens=None):
    return RequestRecord(i, arrival_s=send, send_s=send, prompt_len=prompt_len, max_tokens=out,
                         token_times_s=times, chunk_tokens=chunk_tokens or [1] * len(times),
                         output_tokens=out, prompt_tokens=prompt_tokens, error_kind=error,
                         status=429 if error else 200, end_s=send + 0.5)


RECORDS = [
    rec(0, 0.0, [0.10, 0.12, 0.14, 0.16], 4),  # steady 20 ms decode
    rec(1, 1.0, [1.20], 1),  # one token: no TPOT
    rec(2, 2.0, [2.05, 2.15], 4, chunk_tokens=[1, 3], prompt_tokens=12),  # a chunk of 3 tokens
    rec(3, 3.0, [], 0, error="http_429"),
]


def test_request_metrics_follow_vllm_definitions():
    m = request_metrics(RECORDS[0])
    assert m.ttft_s == pytest.approx(0.10)
    assert m.e2e_s == pytest.approx(0.16)
    assert m.tpot_s == pytest.approx(0.02)
    assert m.itl_s == pytest.approx([0.02, 0.02, 0.02])
    assert request_metrics(RECORDS[1]).tpot_s is None  # single-token reply has no TPOT
    multi = request_metrics(RECORDS[2])
    assert multi.tpot_s == pytest.approx(0.10 / 3)  # (E2E - TTFT) / (tokens - 1), tokens from usage
    assert multi.itl_s == pytest.approx([0.10])  # a multi-token chunk is one gap
    assert request_metrics(RECORDS[3]) is None


def test_summary_pools_itl_and_excludes_single_token_tpot():
    s = summarize(RECORDS, duration_s=4.0)
    assert (s.num_requests, s.completed, s.failed) == (4, 3, 1)
    assert s.errors == {"http_429": 1}
    assert s.tpot.count == 2 and s.tpot.mean == pytest.approx((0.02 + 0.1 / 3) / 2)
    assert s.itl.count == 4 and s.itl.mean == pytest.approx((0.02 * 3 + 0.10) / 4)
    assert s.ttft.count == 3 and s.e2e.mean == pytest.approx((0.16 + 0.20 + 0.15) / 3)
    assert s.total_output_tokens == 9 and s.total_input_tokens == 10 + 10 + 12  # usage wins when offered
    assert s.request_throughput == pytest.approx(3 / 4.0)
    assert s.output_throughput == pytest.approx(9 / 4.0)
    assert s.total_token_throughput == pytest.approx((32 + 9) / 4.0)
    assert s.attainment is None and s.goodput is None


def test_percentiles_use_linear_interpolation():
    st = stats([0.10, 0.20, 0.05], (50, 90, 99))
    # sorted [0.05, 0.10, 0.20]: rank 0.9 * 2 = 1.8 -> 0.10 + 0.8 * (0.20 - 0.10)
    assert st.percentiles == pytest.approx({50: 0.10, 90: 0.18, 99: 0.10 + 0.98 * 0.10})
    assert (st.min, st.max, st.count) == (0.05, 0.20, 3)
    empty = stats([], (50,))
    assert empty.count == 0 and empty.mean is None and empty.percentiles == {50: None}


def test_attainment_counts_failures_as_misses():
    s = summarize(RECORDS, 4.0, slo=SLO(ttft_s=0.15, tpot_s=0.025))
    # 0 meets both; 1 misses TTFT; 2 misses TPOT (33 ms); 3 failed.
    assert s.num_good == 1 and s.attainment == pytest.approx(1 / 4) and s.goodput == pytest.approx(1 / 4.0)
    loose = summarize(RECORDS, 4.0, slo=SLO(ttft_s=0.25))
    assert loose.num_good == 3 and loose.attainment == pytest.approx(3 / 4)  # the 429 still misses
    single = summarize([RECORDS[1]], 1.0, slo=SLO(tpot_s=0.001))
    assert single.num_good == 1  # no TPOT for one token: cannot violate the TPOT bound (vLLM: 0)


def test_zero_duration_does_not_crash():
    s = summarize([RECORDS[3]], 0.0, slo=SLO(e2e_s=1.0))
    assert s.completed == 0 and math.isnan(s.request_throughput) and s.attainment == 0.0
