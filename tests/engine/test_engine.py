"""LLMEngine: stop conditions, per-token times from the injected clock, abort at any point."""
import pytest

from sloserve.engine.engine import LLMEngine
from sloserve.engine.scheduler import SchedulerConfig
from sloserve.request import SamplingParams

from .fakes import CountingExecutor, LetterTokenizer, TickingClock, run_to_completion


def make_engine(max_num_batched_tokens: int = 512, **kw) -> LLMEngine:
    kw.setdefault("eos_token_ids", frozenset({50}))
    config = SchedulerConfig(max_num_batched_tokens=max_num_batched_tokens, block_size=4)
    return LLMEngine(CountingExecutor(), config, max_model_len=64, vocab_size=100, clock=TickingClock(), **kw)



@pytest.mark.parametrize(
    "params, prompt, tokens, reason, stop_reason",
    [
        (SamplingParams(max_tokens=3), [10], [11, 12, 13], "length", None),
        (SamplingParams(max_tokens=10), [47], [48, 49, 50], "stop", None),  # EOS is kept in the ids
        (SamplingParams(max_tokens=4, ignore_eos=True), [48], [49, 50, 51, 52], "length", None),
        (SamplingParams(max_tokens=10, stop_token_ids=[22]), [20], [21, 22], "stop", 22),
    ],
)
def test_stop_conditions(params, prompt, tokens, reason, stop_reason):
    engine = make_engine()
    engine.add_request("r", prompt, params)
    out = run_to_completion(engine)["r"].outputs[0]
    assert (out.token_ids, out.finish_reason, out.stop_reason) == (tokens, reason, stop_reason)


def test_stop_string_cuts_the_text_before_it():
    engine = make_engine(tokenizer=LetterTokenizer())
    engine.add_request("r", [0], SamplingParams(max_tokens=10, stop=["def"]))  # emits b, c, d, e, f, ...
    out = run_to_completion(engine)["r"].outputs[0]
    assert (out.text, out.finish_reason, out.stop_reason) == ("bc", "stop", "def")


def test_output_stops_at_the_model_length():
    engine = make_engine(eos_token_ids=frozenset())
    engine.add_request("r", list(range(1, 61)), SamplingParams(max_tokens=10))
    out = run_to_completion(engine)["r"].outputs[0]
    assert (len(out.token_ids), out.finish_reason) == (4, "length")


def test_token_times_come_from_the_injected_clock():
    engine = make_engine()
    engine.add_request("r", [1, 2, 3], SamplingParams(max_tokens=3))
    out = run_to_completion(engine)["r"]
    assert out.arrival_time == pytest.approx(0.001)
    assert all(b > a for a, b in zip(out.outputs[0].token_times, out.outputs[0].token_times[1:]))
    assert out.ttft == pytest.approx(out.outputs[0].token_times[0] - 0.001)


@pytest.mark.parametrize("abort_after_steps", [0, 1, 2, 5])
def test_abort_at_any_point_frees_the_blocks(abort_after_steps):
    engine = make_engine(max_num_batched_tokens=8)
    engine.add_request("victim", list(range(1, 21)), SamplingParams(max_tokens=20))
    engine.add_request("other", [5, 6], SamplingParams(max_tokens=3))
    for _ in range(abort_after_steps):
        engine.step()
    assert engine.abort_request("victim")
    assert not engine.abort_request("victim")
    run_to_completion(engine)
    assert engine.block_manager.num_used_blocks == 0
    assert "victim" not in engine.requests


def test_duplicate_request_id_is_refused():
    engine = make_engine()
    engine.add_request("r", [1], SamplingParams())
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("r", [1], SamplingParams())


def test_stop_strings_without_a_tokenizer_are_refused():
    with pytest.raises(ValueError, match="need a tokenizer"):
        make_engine().add_request("r", [1], SamplingParams(stop=["x"]))
