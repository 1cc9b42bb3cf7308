"""Speculation inside the engine's step: drafts spend the token budget, rejected drafts roll back, several
tokens per step pass through the stop checks (a stop in the middle of an accepted run cuts there)."""
from sloserve.engine.engine import LLMEngine
from sloserve.engine.scheduler import SchedulerConfig
from sloserve.request import SamplingParams
from tests.engine.fakes import LetterTokenizer, TickingClock, run_to_completion


class CountingVerifier:
    """The 'model' always continues with last token + 1; drafts are verified against that, greedily."""

    def __init__(self, num_kv_blocks: int = 64) -> None:
        self.num_kv_blocks = num_kv_blocks
        self.plans = []

    def execute(self, plan):
        self.plans.append(plan)
        out = []
        for s in plan.scheduled:
            if not s.samples:
                out.append([])
                continue
            k = len(s.spec_token_ids)
            base = s.token_ids[-k - 1]
            tokens = []
            for i, d in enumerate(s.spec_token_ids):
                tokens.append(base + 1 + i)
                if d != base + 1 + i:
                    break
            else:
                tokens.append(base + 1 + k)
            out.append(tokens)
        return out


class ScriptedSpeculator:
    """Drafts K tokens per decoding request: right for the first `right` of them, wrong after."""

    def __init__(self, k: int, right: int) -> None:
        self.k, self.right = k, right
        self.observed, self.forgotten = [], []

    def propose(self, running, predictor):
        drafts = {}
        for r in running:
            if r.num_computed_tokens == r.num_tokens - 1:
                last = r.all_token_ids[-1]
                drafts[r.request_id] = [last + 1 + i if i < self.right else 0 for i in range(self.k)]
        return drafts

    def observe(self, plan, sampled):
        self.observed.append((plan, sampled))

    def forget(self, request_ids):
        self.forgotten += request_ids


def make(k=3, right=3, budget=512, **kw):
    executor = CountingVerifier(kw.pop("num_kv_blocks", 64))
    spec = ScriptedSpeculator(k, right)
    engine = LLMEngine(executor, SchedulerConfig(max_num_batched_tokens=budget, block_size=4), max_model_len=200,
                       vocab_size=1000, clock=TickingClock(), speculator=spec, **kw)
    return engine, executor, spec



def test_accepted_runs_give_several_tokens_a_step_and_stop_at_max_tokens():
    engine, executor, _ = make(k=3, right=3)
    engine.add_request("r", [10, 11], SamplingParams(max_tokens=9))
    out = run_to_completion(engine)["r"]
    assert out.outputs[0].token_ids == list(range(12, 21))
    # prefill (1 token out), then verifications of 3 drafts giving 4 tokens each: 1 + 4 + 4 = 9
    assert [s.num_new_tokens for p in executor.plans for s in p.scheduled] == [2, 4, 4]
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_rejected_drafts_roll_back_num_computed_tokens():
    engine, executor, _ = make(k=3, right=1)
    engine.add_request("r", [10, 11], SamplingParams(max_tokens=7))
    request = engine.requests["r"]
    engine.step()
    while engine.has_unfinished_requests():
        engine.step()
        if engine.has_unfinished_requests():
            # Two tokens a step (one accepted draft, one correction); KV holds all but the newest token.
            assert request.num_computed_tokens == request.num_tokens - 1
    assert request.output_token_ids == list(range(12, 19))
    verifies = [s for p in executor.plans for s in p.scheduled if s.spec_token_ids]
    assert verifies and all(s.num_new_tokens == 4 for s in verifies)


def test_a_stop_token_inside_an_accepted_run_cuts_there():
    engine, _, _ = make(k=4, right=4)
    engine.add_request("r", [10, 11], SamplingParams(max_tokens=20, stop_token_ids=[15]))
    out = run_to_completion(engine)["r"]
    assert (out.outputs[0].token_ids, out.outputs[0].finish_reason, out.outputs[0].stop_reason) == ([12, 13, 14, 15], "stop", 15)
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_eos_and_stop_strings_inside_an_accepted_run_cut_there():
    engine, _, _ = make(k=4, right=4, eos_token_ids=frozenset({14}))
    engine.add_request("eos", [10, 11], SamplingParams(max_tokens=20))
    assert run_to_completion(engine)["eos"].outputs[0].token_ids == [12, 13, 14]
    engine, _, _ = make(k=4, right=4, tokenizer=LetterTokenizer())
    engine.add_request("str", [1], SamplingParams(max_tokens=20, stop=["ef"]))  # emits c, d, e, f, ...
    out = run_to_completion(engine)["str"]
    assert (out.outputs[0].text, out.outputs[0].finish_reason, out.outputs[0].stop_reason) == ("cd", "stop", "ef")


def test_drafts_spend_the_token_budget():
    engine, executor, _ = make(k=4, right=4, budget=12)
    for i in range(4):
        engine.add_request(str(i), [100 * (i + 1)], SamplingParams(max_tokens=30))
    run_to_completion(engine)
    for plan in executor.plans:
        assert plan.num_batched_tokens <= 12
    # A step that cannot give every request its drafts cuts them; one token each still flows.
    assert any(0 < len(s.spec_token_ids) < 4 for p in executor.plans for s in p.scheduled)


def test_speculation_never_preempts_and_blocks_are_freed():
    # 12 blocks of 4: four requests fit without drafts' extra blocks only part of the time.
    engine, executor, spec = make(k=4, right=2, num_kv_blocks=12)
    for i in range(4):
        engine.add_request(str(i), [100 * (i + 1)] * 5, SamplingParams(max_tokens=6))
    outs = run_to_completion(engine)
    for request_id, out in outs.items():
        first = 100 * (int(request_id) + 1) + 1
        assert out.outputs[0].token_ids == list(range(first, first + 6))
    assert sum(o.num_preemptions for o in outs.values()) == 0
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    assert set(spec.forgotten) >= {"0", "1", "2", "3"}
