"""The simulator is the engine: the real LLMEngine, Scheduler and policies drive the SimulatedExecutor."""
import pytest
from conftest import known_profile

from sloserve.bench.metrics import request_metrics
from sloserve.bench.workload import RequestSpec
from sloserve.config import EngineConfig
from sloserve.engine.cost import StepCostModel
from sloserve.engine.engine import LLMEngine
from sloserve.engine.scheduler import Scheduler, SchedulerOutput
from sloserve.llm import build_engine
from sloserve.request import SamplingParams
from sloserve.sim.clock import VirtualClock
from sloserve.sim.executor import SimulatedExecutor
from sloserve.sim.simulate import EngineKnobs, build_sim_engine, simulate

KNOBS = EngineKnobs(max_num_batched_tokens=32, max_num_seqs=2, num_kv_blocks=64, max_model_len=256, block_size=16,
                    vocab_size=384)


def specs(n, prompt_len=lambda i: 10 + 7 * i % 30, output_len=lambda i: 3 + i % 4, arrival=lambda i: 0.0):
    return [RequestSpec(i, [50 + (i * 13 + j) % 300 for j in range(prompt_len(i))], prompt_len(i), output_len(i),
                        arrival(i)) for i in range(n)]


def run(policy, workload, priority=None, knobs=KNOBS, **kw):
    clock = VirtualClock()
    engine = build_sim_engine(known_profile().step_model, knobs, policy, clock)
    return engine, simulate(engine, clock, workload, priority=priority, **kw)


def test_the_simulated_executor_is_driven_by_the_engines_scheduler(monkeypatch):
    plans = []
    real_schedule = Scheduler.schedule

    def spy(self):
        plan = real_schedule(self)
        plans.append(plan)
        return plan

    monkeypatch.setattr(Scheduler, "schedule", spy)
    seen = []
    monkeypatch.setattr(SimulatedExecutor, "execute", lambda self, plan, _real=SimulatedExecutor.execute: (
        seen.append(plan), _real(self, plan))[1])
    engine, outcome = run("fcfs", specs(6))
    assert type(engine) is LLMEngine and type(engine.scheduler) is Scheduler
    assert isinstance(engine.executor, SimulatedExecutor) and engine.clock is engine.executor.clock
    assert seen and all(isinstance(p, SchedulerOutput) for p in seen)
    assert seen == [p for p in plans if p.scheduled]  # every plan it ran came from Scheduler.schedule
    assert outcome.num_steps == len(seen)
    assert all(r.success and r.output_tokens == r.max_tokens for r in outcome.records)


def test_token_times_come_from_the_step_time_model():
    profile = known_profile()
    engine, outcome = run("fcfs", specs(1, prompt_len=lambda i: 20, output_len=lambda i: 3))
    r = outcome.records[0]
    prefill = profile.step_seconds(_shape([20], [0]))
    decode = [profile.step_seconds(_shape([1], [c])) for c in (20, 21)]
    assert r.token_times_s == pytest.approx([prefill, prefill + decode[0], prefill + sum(decode)])
    assert request_metrics(r).ttft_s == pytest.approx(prefill)


def test_a_machine_slower_than_its_profile_stretches_every_step_and_the_predictor_learns_it():
    """`machine` prices the executor's steps; the engine's predictor starts from the profile and calibrates
    online, as a server's does: the same plans take twice as long, and its prices follow the machine."""
    profile = known_profile()
    slow = StepCostModel(profile.step_model.knots, [2 * c for c in profile.step_model.coefficients])
    workload = specs(40)  # a burst: the plans cannot depend on when arrivals fall between steps
    outcomes = {}
    for name, machine in (("profiled", None), ("slow", slow)):
        clock = VirtualClock()
        engine = build_sim_engine(profile.step_model, KNOBS, "fcfs", clock, machine=machine)
        outcomes[name] = simulate(engine, clock, workload)
        assert engine.block_manager.num_used_blocks == 0
    assert outcomes["slow"].num_steps == outcomes["profiled"].num_steps  # FCFS plans do not depend on prices
    assert outcomes["slow"].busy_s == pytest.approx(2 * outcomes["profiled"].busy_s)
    assert engine.predictor.num_refits > 0
    decode = _shape([1, 1], [40, 60])
    assert engine.predictor.step_seconds(decode) == pytest.approx(slow.step_seconds(decode), rel=0.05)


def _shape(new, ctx):
    from sloserve.engine.features import StepShape

    return StepShape(new, ctx, [True] * len(new))


def test_priority_policy_lowers_simulated_ttft_of_high_priority_requests():
    workload = specs(12)
    priority = lambda s: 0 if s.index % 3 == 2 else 1  # noqa: E731 - every third request is latency-sensitive
    ttft = {}
    for name in ("fcfs", "priority"):
        _, outcome = run(name, workload, priority)
        high = [request_metrics(r).ttft_s for r in outcome.records if r.index % 3 == 2]
        ttft[name] = sum(high) / len(high)
    assert ttft["priority"] < 0.6 * ttft["fcfs"]


@pytest.mark.parametrize("policy_name", ["fcfs", "priority"])
def test_simulated_schedule_order_equals_the_real_engines(tiny_model_dir, policy_name):
    """Same arrivals, same knobs: the first-scheduled order of the sim and of a real tiny model agree."""
    workload = specs(10)
    priorities = [(i * 7) % 4 for i in range(10)]
    real = build_engine(EngineConfig(model=str(tiny_model_dir("smollm")), num_kv_blocks=KNOBS.num_kv_blocks,
                                     max_num_batched_tokens=KNOBS.max_num_batched_tokens,
                                     max_num_seqs=KNOBS.max_num_seqs, policy=policy_name))
    order: list[str] = []
    inner = real.executor

    class Recorder:
        num_kv_blocks = inner.num_kv_blocks

        def execute(self, plan):
            order.extend(s.request_id for s in plan.scheduled if s.request_id not in order)
            return inner.execute(plan)

    real.executor = Recorder()
    for spec in workload:
        real.add_request(str(spec.index), spec.prompt, SamplingParams(max_tokens=spec.output_len, temperature=0.0,
                                                                      ignore_eos=True),
                         priority=priorities[spec.index], arrival_time=0.0)
    while real.has_unfinished_requests():
        real.step()
    _, outcome = run(policy_name, workload, lambda s: priorities[s.index])
    assert outcome.first_scheduled == [int(i) for i in order]
    if policy_name == "priority":
        assert [priorities[i] for i in outcome.first_scheduled] == sorted(priorities)


def test_concurrency_cap_and_idle_gaps():
    workload = specs(6, arrival=lambda i: 100.0 * (i // 3))  # two bursts 100 s apart
    engine, outcome = run("fcfs", workload, max_concurrency=1)
    records = outcome.records
    for a, b in zip(records, records[1:]):
        if b.arrival_s == a.arrival_s:
            assert b.send_s == pytest.approx(a.end_s)  # waited for the one slot
    assert records[3].send_s == 100.0  # the clock jumped across the idle gap
    assert outcome.busy_s < 10 < outcome.duration_s


def test_requests_the_engine_refuses_are_recorded_as_400s():
    too_long = specs(2, prompt_len=lambda i: 300 if i == 0 else 10)  # longer than max_model_len
    _, outcome = run("fcfs", too_long)
    bad, good = outcome.records
    assert bad.status == 400 and bad.error_kind == "http_400" and not bad.success
    assert good.success
