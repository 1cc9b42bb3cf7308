"""SLO parsing and the max-goodput-rate bisection on a synthetic attainment curve."""
import pytest

from sloserve.bench.slo import SLO
from sloserve.bench.sweep import SweepConfig, find_max_goodput_rate


def test_parse_slo_units_and_aliases():
    assert SLO.parse("ttft=200ms,tpot=50ms,e2e=2s") == SLO(0.2, 0.05, 2.0)
    assert SLO.parse("ttft:200 e2el:1500") == SLO(ttft_s=0.2, e2e_s=1.5)  # vLLM --goodput style, ms
    assert SLO.parse("TPOT=0.5s").tpot_s == 0.5
    for bad in ("", "ttft", "foo=1ms", "ttft=fast", "ttft=-1ms"):
        with pytest.raises(ValueError):
            SLO.parse(bad)
    assert SLO(0.2, None, 2.0).describe() == "TTFT <= 200 ms, E2E <= 2000 ms"


def test_slo_bounds_are_inclusive():
    slo = SLO(ttft_s=0.2, tpot_s=0.05)
    assert slo.met(0.2, 0.05, 9.0)
    assert not slo.met(0.2001, 0.05, 9.0)
    assert slo.met(0.1, None, 9.0)


def cliff(capacity):
    calls = []

    def probe(rate):
        calls.append(rate)
        return 1.0 if rate <= capacity else 0.3

    return probe, calls


def test_bisection_brackets_then_converges():
    probe, calls = cliff(13.3)
    res = find_max_goodput_rate(probe, SweepConfig(target=0.9, start_rate=1.0, rel_tol=0.02, max_probes=20))
    assert calls[:5] == [1, 2, 4, 8, 16]  # doubling until the first miss
    assert res.max_rate <= 13.3 < res.upper_rate
    assert (res.upper_rate - res.max_rate) <= 0.02 * res.upper_rate
    assert [r for r, _ in res.probes] == calls


def test_bisection_halves_down_and_reports_none_when_nothing_meets():
    probe, calls = cliff(0.7)
    res = find_max_goodput_rate(probe, SweepConfig(start_rate=4.0, rel_tol=0.1))
    assert calls[:4] == [4.0, 2.0, 1.0, 0.5]
    assert res.max_rate <= 0.7 < res.upper_rate
    never, _ = cliff(-1)
    res = find_max_goodput_rate(never, SweepConfig(start_rate=1.0, min_rate=0.25))
    assert res.max_rate is None and res.upper_rate == 0.25


def test_bisection_respects_probe_budget_and_max_rate():
    probe, calls = cliff(1e9)
    res = find_max_goodput_rate(probe, SweepConfig(start_rate=1.0, max_rate=8.0))
    assert res.max_rate == 8.0 and res.upper_rate is None and calls == [1, 2, 4, 8]
    probe, calls = cliff(13.3)
    find_max_goodput_rate(probe, SweepConfig(start_rate=1.0, max_probes=6, rel_tol=1e-9))
    assert len(calls) == 6
