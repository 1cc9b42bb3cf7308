"""Against a fake server with known timing: measured TTFT/TPOT/ITL/E2E, attainment and goodput, and errors."""
import asyncio
import json
import socket

import pytest
from bench_fake_server import Behaviour, FakeOpenAIServer, Script

from sloserve.bench.arrivals import Arrivals
from sloserve.bench.client import ClientConfig
from sloserve.bench.lengths import LengthDist
from sloserve.bench.metrics import summarize
from sloserve.bench.runner import play
from sloserve.bench.slo import SLO
from sloserve.bench.synthetic import SyntheticSource
from sloserve.bench.trace import TraceSource
from sloserve.bench.workload import Workload

TOL = 0.005  # 5 ms


def trace_workload(tmp_path, prompts_and_lens, concurrency=None):
    path = tmp_path / "trace.jsonl"
    path.write_text("".join(json.dumps({"arrival_s": 0.0, "prompt": p, "output_len": n}) + "\n"
                            for p, n in prompts_and_lens))
    return Workload(TraceSource(str(path)), Arrivals("trace"), None, max_concurrency=concurrency)


def test_measures_known_timing_within_5ms():
    # TTFT 100 ms, then a token every 20 ms, 10 tokens: E2E 280 ms, TPOT = ITL = 20 ms.
    n = 8
    script = Script(Behaviour(ttft_s=0.100, gap_s=0.020))
    w = Workload(SyntheticSource(LengthDist(16), LengthDist(10), vocab_size=1000), Arrivals(), n, max_concurrency=1)
    with FakeOpenAIServer(script) as srv:
        run = asyncio.run(play(w, ClientConfig(srv.base_url, model="m"), num_warmups=1))
        log = srv.log()
    s = summarize(run.records, run.duration_s, slo=SLO(ttft_s=1.0, tpot_s=0.5))  # loose: a busy machine stalls
    assert (s.completed, s.failed, s.total_output_tokens) == (n, 0, n * 10)
    assert all(r.output_tokens_source == "usage" and r.prompt_tokens == 16 for r in run.records)
    # Other processes on a shared machine can only make the server or the
    # client *late*, never early: every TTFT/E2E is at least the scripted
    # value, and the least-disturbed request is within 5 ms of it. Gaps are
    # scripted on absolute deadlines, so TPOT and ITL stay within 5 ms.
    assert s.ttft.min >= 0.100 and s.ttft.min == pytest.approx(0.100, abs=TOL)
    assert s.e2e.min >= 0.280 and s.e2e.min == pytest.approx(0.280, abs=TOL)
    assert s.tpot.min == pytest.approx(0.020, abs=TOL) and s.tpot.max == pytest.approx(0.020, abs=TOL)
    assert s.itl.count == n * 9
    assert s.itl.mean == pytest.approx(0.020, abs=TOL) and s.itl.percentiles[50] == pytest.approx(0.020, abs=TOL)
    assert s.attainment == 1.0 and s.num_good == n and s.goodput == pytest.approx(n / run.duration_s)
    # Against what the server actually did (its own clock, late or not): the
    # client never sees a token before it was written; its own overhead
    # (send path, read wake-up) is within 5 ms on an undisturbed request.
    served = log[-n:]
    ttft_gap = [r.token_times_s[0] - r.send_s - (e["writes"][0] - e["recv"]) for r, e in zip(run.records, served)]
    e2e_gap = [r.token_times_s[-1] - r.send_s - (e["writes"][-1] - e["recv"]) for r, e in zip(run.records, served)]
    assert 0 <= min(ttft_gap) < TOL and 0 <= min(e2e_gap) < TOL
    for r, e in zip(run.records, served):  # each inter-token gap as the server wrote it
        client_gaps = [b - a for a, b in zip(r.token_times_s, r.token_times_s[1:])]
        server_gaps = [b - a for a, b in zip(e["writes"], e["writes"][1:])]
        assert sorted(abs(c - g) for c, g in zip(client_gaps, server_gaps))[len(server_gaps) // 2] < TOL
    # Server saw: 1 test request + 1 warm-up + n measured, all streamed with usage.
    bodies = [e["body"] for e in log]
    assert len(bodies) == n + 2 and all(b["stream"] and b["stream_options"] == {"include_usage": True} for b in bodies)
    assert bodies[-1]["max_tokens"] == 10 and "ignore_eos" not in bodies[-1]


def test_concurrent_requests_keep_exact_gaps_and_chunk_counts_without_usage():
    script = Script(Behaviour(ttft_s=0.05, gap_s=0.02, usage=False))
    w = Workload(SyntheticSource(LengthDist(8), LengthDist(6), vocab_size=1000), Arrivals(), 8)
    with FakeOpenAIServer(script) as srv:
        run = asyncio.run(play(w, ClientConfig(srv.base_url, model="m", ignore_eos=True)))
        assert srv.bodies()[-1]["ignore_eos"] is True
    s = summarize(run.records, run.duration_s)
    assert s.completed == 8 and all(r.output_tokens_source == "chunks" and r.output_tokens == 6 for r in run.records)
    assert s.tpot.mean == pytest.approx(0.020, abs=TOL)
    assert s.itl.percentiles[50] == pytest.approx(0.020, abs=TOL)


def test_multi_token_chunks_are_one_gap_and_counted_from_continuous_usage():
    # 12 tokens in 4 chunks of 3, 30 ms apart: E2E - TTFT = 90 ms over 11 tokens.
    script = Script(Behaviour(ttft_s=0.05, gap_s=0.03, tokens_per_chunk=3))
    w = Workload(SyntheticSource(LengthDist(8), LengthDist(12), vocab_size=1000), Arrivals(), 3, max_concurrency=1)
    with FakeOpenAIServer(script) as srv:
        run = asyncio.run(play(w, ClientConfig(srv.base_url, model="m", continuous_usage=True)))
        assert srv.bodies()[-1]["stream_options"] == {"include_usage": True, "continuous_usage_stats": True}
    s = summarize(run.records, run.duration_s)
    assert all(r.chunk_tokens == [3, 3, 3, 3] and r.output_tokens == 12 for r in run.records)
    assert s.itl.count == 3 * 3 and s.itl.percentiles[50] == pytest.approx(0.030, abs=TOL)
    assert s.tpot.percentiles[50] == pytest.approx(0.090 / 11, abs=TOL)


def test_attainment_and_goodput_with_known_mix(tmp_path):
    # SLO: TTFT <= 400 ms, TPOT <= 60 ms. Margins are wide (a stall of 100+ ms
    # on a busy machine must not flip a verdict); lateness can only add time.
    script = Script(by_prompt={
        "fast": Behaviour(ttft_s=0.05, gap_s=0.01),  # TTFT 50, TPOT 10: meets
        "slow": Behaviour(ttft_s=0.60, gap_s=0.01),  # TTFT 600: misses
        "drip": Behaviour(ttft_s=0.05, gap_s=0.15),  # TPOT 150: misses
        "single": Behaviour(ttft_s=0.05, n_tokens=1),  # no TPOT: meets
        "reject": Behaviour(status=429),  # rejected: misses
    })
    w = trace_workload(tmp_path, [("fast", 3), ("slow", 3), ("drip", 3), ("single", 3), ("reject", 3)], 1)
    with FakeOpenAIServer(script) as srv:
        run = asyncio.run(play(w, ClientConfig(srv.base_url, model="m")))
    s = summarize(run.records, run.duration_s, slo=SLO(ttft_s=0.4, tpot_s=0.06))
    assert (s.num_requests, s.completed, s.num_good) == (5, 4, 2)
    assert s.attainment == pytest.approx(2 / 5)
    assert s.goodput == pytest.approx(2 / run.duration_s)
    busy = 0.07 + 0.62 + 0.35 + 0.05  # the four answered requests' known service times, served one at a time
    assert busy <= run.duration_s <= busy + 0.1  # plus each request's small client/transport overhead
    assert s.tpot.count == 3 and s.errors == {"http_429": 1}


def test_errors_timeouts_and_429s_are_counted_not_raised(tmp_path):
    script = Script(by_prompt={
        "ok": Behaviour(ttft_s=0.01, gap_s=0.01),
        "reject": Behaviour(status=429),
        "boom": Behaviour(status=500),
        "hang": Behaviour(hang_s=5.0),
        "drop": Behaviour(ttft_s=0.01, gap_s=0.01, drop_after=2),
        "streamerr": Behaviour(ttft_s=0.01, gap_s=0.01, error_event_after=1),
    })
    names = ["ok", "reject", "boom", "hang", "drop", "streamerr"]
    w = trace_workload(tmp_path, [(n, 5) for n in names])
    with FakeOpenAIServer(script) as srv:
        run = asyncio.run(play(w, ClientConfig(srv.base_url, model="m", timeout_s=0.5)))
    s = summarize(run.records, run.duration_s, slo=SLO(e2e_s=10.0))
    assert s.errors == {"http_429": 1, "http_500": 1, "timeout": 1, "connection": 1, "stream_error": 1}
    by_name = dict(zip(names, run.records))
    assert by_name["reject"].status == 429 and "scripted 429" in by_name["reject"].error
    assert by_name["drop"].token_times_s and not by_name["drop"].success  # partial stream is still a failure
    assert s.completed == 1 and s.num_good == 1 and s.attainment == pytest.approx(1 / 6)
    assert run.duration_s < 2.0  # the hung request was cut at the 0.5 s timeout


def test_unreachable_server_is_connection_errors():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed when the block ends: nothing listens there
    w = Workload(SyntheticSource(LengthDist(4), LengthDist(2)), Arrivals(), 3)
    run = asyncio.run(play(w, ClientConfig(f"http://127.0.0.1:{port}", model="m")))
    s = summarize(run.records, run.duration_s, slo=SLO(ttft_s=1.0))
    assert s.errors == {"connection": 3} and s.attainment == 0.0 and s.goodput == 0.0


def test_duration_limit_stops_sending(tmp_path):
    script = Script(Behaviour(ttft_s=0.01, gap_s=0.01))
    w = Workload(SyntheticSource(LengthDist(4), LengthDist(2)), Arrivals(), 1000, duration_s=0.3, max_concurrency=2)
    with FakeOpenAIServer(script) as srv:
        run = asyncio.run(play(w, ClientConfig(srv.base_url, model="m")))
    assert 4 <= len(run.records) < 200  # each pair takes ~20 ms: far fewer than 1000 were sent
    assert all(r.send_s < 0.3 for r in run.records) and run.duration_s < 1.0
