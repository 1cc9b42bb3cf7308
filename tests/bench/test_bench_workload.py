"""Workloads: seeded determinism, length clipping, arrival means, datasets, traces."""
import json

import numpy as np
import pytest

from sloserve.bench.arrivals import Arrivals
from sloserve.bench.lengths import LengthDist
from sloserve.bench.sharegpt import ShareGPTSource
from sloserve.bench.synthetic import SyntheticSource
from sloserve.bench.trace import TraceSource, parse_trace_line
from sloserve.bench.workload import Workload


class CharTokenizer:
    """One token per character: enough to check where a tokenizer is used."""

    vocab_size = 128

    def encode(self, text):
        return [ord(c) % 128 for c in text]

    def decode(self, ids):
        return "".join(chr(97 + i % 26) for i in ids)


def synthetic(**kw):
    return SyntheticSource(LengthDist(64, "normal", 0.5), LengthDist(16, "lognormal", 0.5), **kw)


def test_same_seed_same_requests_other_seed_other_requests():
    w = Workload(synthetic(prefix_len=4), Arrivals("poisson", 5.0), 50, seed=3)
    assert w.requests() == Workload(synthetic(prefix_len=4), Arrivals("poisson", 5.0), 50, seed=3).requests()
    other = Workload(synthetic(prefix_len=4), Arrivals("poisson", 5.0), 50, seed=4).requests()
    assert [s.prompt for s in other] != [s.prompt for s in w.requests()]


def test_lengths_are_clipped_and_distributed_as_documented():
    rng = np.random.default_rng(0)
    clipped = LengthDist(100, "normal", 1.0, min=50, max=120).sample(2000, rng)
    assert min(clipped) == 50 and max(clipped) == 120
    uni = LengthDist(100, "uniform", 0.5).sample(20000, rng)
    assert min(uni) == 50 and max(uni) == 150 and np.mean(uni) == pytest.approx(100, rel=0.02)
    logn = np.array(LengthDist(200, "lognormal", 0.5).sample(50000, rng))
    assert logn.mean() == pytest.approx(200, rel=0.02) and logn.std() / logn.mean() == pytest.approx(0.5, rel=0.05)
    assert LengthDist(7, "fixed", 0.9).sample(5, rng) == [7] * 5
    assert LengthDist(7).sample(3, rng) == [7] * 3  # uniform with range ratio 0 == fixed, as vLLM
    with pytest.raises(ValueError):
        LengthDist(10, "uniform", 1.0)
    with pytest.raises(ValueError):
        LengthDist(10, "zipf")


@pytest.mark.parametrize("kind,burstiness,cv", [("poisson", 1.0, 1.0), ("gamma", 0.25, 2.0), ("gamma", 4.0, 0.5)])
def test_gamma_and_poisson_gaps_have_mean_one_over_rate(kind, burstiness, cv):
    offsets = Arrivals(kind, rate=8.0, burstiness=burstiness).offsets(40001, np.random.default_rng(1))
    gaps = np.diff(offsets)
    assert offsets[0] == 0.0
    assert gaps.mean() == pytest.approx(1 / 8.0, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.05)  # gamma shape k: CV = 1/sqrt(k)


def test_constant_burst_and_duration_cut():
    rng = np.random.default_rng(0)
    assert Arrivals("constant", 4.0).offsets(4, rng) == [0.0, 0.25, 0.5, 0.75]
    assert Arrivals("burst").offsets(3, rng) == [0.0] * 3
    assert Arrivals("poisson", float("inf")).offsets(2, rng) == [0.0, 0.0]  # vLLM: rate inf sends at once
    w = Workload(synthetic(), Arrivals("constant", 10.0), num_requests=None, duration_s=1.0)
    assert len(w.requests()) == 10  # arrivals at 0.0 .. 0.9; 1.0 is not before the limit
    poisson = Workload(synthetic(), Arrivals("poisson", 50.0), None, duration_s=2.0).requests()
    assert all(s.arrival_s < 2.0 for s in poisson) and 60 < len(poisson) < 140
    with pytest.raises(ValueError):
        Workload(synthetic(), Arrivals("burst"), num_requests=None, duration_s=1.0)


def test_sweeps_change_arrivals_not_prompts_and_warmups_use_other_prompts():
    w = Workload(synthetic(), Arrivals("poisson", 2.0), 20)
    fast = w.with_rate(8.0)
    assert fast.arrivals.kind == "poisson" and fast.arrivals.rate == 8.0
    a, b = w.requests(), fast.requests()
    assert [s.prompt for s in a] == [s.prompt for s in b]
    assert b[-1].arrival_s == pytest.approx(a[-1].arrival_s / 4)  # same unit draws, scaled
    warm = w.warmup_requests(3)
    assert len(warm) == 3 and all(s.arrival_s == 0 for s in warm)
    assert not {tuple(s.prompt) for s in warm} & {tuple(s.prompt) for s in a}
    assert Workload(synthetic(), Arrivals(), 5).with_rate(3.0).arrivals.kind == "poisson"


def test_token_id_prompts_share_prefix_and_stay_in_vocab():
    src = SyntheticSource(LengthDist(20, "uniform", 0.5), LengthDist(8), prefix_len=6, vocab_size=1000)
    specs = Workload(src, Arrivals(), 30).requests()
    for s in specs:
        assert s.prompt[:6] == specs[0].prompt[:6]
        assert len(s.prompt) == s.prompt_len and 16 <= s.prompt_len <= 36
        assert all(100 <= t < 1000 for t in s.prompt) and s.output_len == 8
    assert len({tuple(s.prompt[6:]) for s in specs}) == 30


def test_word_prompts_and_tokenizer_remeasures():
    words = Workload(SyntheticSource(LengthDist(12), LengthDist(4), prompt_format="words"), Arrivals(), 3).requests()
    assert all(isinstance(s.prompt, str) and len(s.prompt.split()) == s.prompt_len == 12 for s in words)
    tok = CharTokenizer()
    decoded = Workload(SyntheticSource(LengthDist(12), LengthDist(4), vocab_size=128), Arrivals(), 3).requests(tok)
    assert all(isinstance(s.prompt, str) and s.prompt_len == len(s.prompt) == 12 for s in decoded)


def test_sharegpt_sample_ships_and_cycles():
    specs = Workload(ShareGPTSource(), Arrivals(), 100, seed=1).requests()
    distinct = {s.prompt for s in specs}
    assert len(distinct) >= 30  # the bundled sample has a few dozen conversations
    assert all(s.prompt_len >= 4 and s.output_len >= 4 for s in specs)
    assert all(s.prompt_len == -(-len(s.prompt) // 4) for s in specs)  # ceil(chars / 4) without a tokenizer
    fixed = Workload(ShareGPTSource(output_len=7), Arrivals(), 5).requests()
    assert {s.output_len for s in fixed} == {7}


def test_trace_replay_keeps_recorded_arrivals(tmp_path):
    path = tmp_path / "t.jsonl"
    lines = [{"arrival_s": 5.0, "prompt_len": 30, "output_len": 4},
             {"arrival_s": 5.5, "prompt": "hello there", "output_len": 2},
             {"timestamp": 6250, "input_length": 12, "output_length": 3}]  # Mooncake style, ms
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    specs = Workload(TraceSource(str(path), vocab_size=500), Arrivals("trace"), None).requests()
    assert [s.arrival_s for s in specs] == pytest.approx([0.0, 0.5, 1.25])
    assert [s.output_len for s in specs] == [4, 2, 3]
    assert len(specs[0].prompt) == specs[0].prompt_len == 30 and specs[1].prompt == "hello there"
    assert specs[2].prompt_len == 12
    assert len(Workload(TraceSource(str(path)), Arrivals("trace"), 2).requests()) == 2
    bundled = Workload(TraceSource(), Arrivals("trace"), None).requests()
    assert len(bundled) == 40 and bundled[0].arrival_s == 0.0
    with pytest.raises(ValueError):
        parse_trace_line({"arrival_s": 1.0, "output_len": 3})
    with pytest.raises(ValueError):
        Workload(synthetic(), Arrivals("trace"), 3)


def test_workload_dict_round_trip():
    for w in (Workload(synthetic(prefix_len=3), Arrivals("gamma", 3.0, 0.5), 10, 20.0, 4, 9),
              Workload(ShareGPTSource(output_len=5), Arrivals(), 3),
              Workload(TraceSource(), Arrivals("trace"), None)):
        again = Workload.from_dict(json.loads(json.dumps(w.to_dict())))
        assert again.to_dict() == w.to_dict() and again.requests() == w.requests()
