"""The policies' ranking of waiting requests: measured into the profile, charged by the simulated executor."""
import json

from conftest import known_profile

from sloserve.engine.features import StepShape
from sloserve.engine.policy import POLICIES
from sloserve.request import SamplingParams
from sloserve.sim.clock import VirtualClock
from sloserve.sim.profile import Profile
from sloserve.sim.rank_cost import rank_seconds_per_waiting
from sloserve.sim.simulate import EngineKnobs, build_sim_engine

KNOBS = EngineKnobs(max_num_batched_tokens=64, max_num_seqs=1, num_kv_blocks=64, max_model_len=256, block_size=16,
                    vocab_size=384)


def first_step(seconds_per_waiting: float) -> tuple[float, int, StepShape]:
    clock = VirtualClock()
    engine = build_sim_engine(known_profile().step_model, KNOBS, "slo", clock, seconds_per_waiting)
    for i in range(5):
        engine.add_request(str(i), [10 + i] * 20, SamplingParams(max_tokens=4), arrival_time=0.0)
    plan = engine.scheduler.schedule()  # what the step will run: the policy ranked all 5 waiting requests
    shape = StepShape.of(plan)
    engine.executor.execute(plan)
    return clock.now(), plan.num_waiting_ranked, shape


def test_the_simulated_executor_charges_each_waiting_request_the_policy_ranked():
    free, ranked, shape = first_step(0.0)
    charged, _, _ = first_step(0.002)
    assert ranked == 5
    assert free == known_profile().step_model.step_seconds(shape)
    assert abs(charged - free - 5 * 0.002) < 1e-12


def test_ranking_costs_are_measured_for_every_policy_and_kept_in_the_profile(tmp_path):
    prof = known_profile()
    prof.rank_seconds_per_waiting = rank_seconds_per_waiting(prof.step_model, 64, 16, num_waiting=32, steps=4)
    assert set(prof.rank_seconds_per_waiting) == set(POLICIES)
    assert all(s >= 0.0 for s in prof.rank_seconds_per_waiting.values())
    path = tmp_path / "profile.json"
    prof.save(str(path))
    assert Profile.load(str(path)).rank_seconds_per_waiting == prof.rank_seconds_per_waiting
    older = json.loads(path.read_text())
    del older["fit"]["rank_seconds_per_waiting"]  # a profile from before the measurement: nothing charged
    assert Profile.from_dict(older).rank_seconds_per_waiting == {}


def test_the_profiler_records_ranking_costs(tiny_profile):
    path, _ = tiny_profile
    assert set(Profile.load(str(path)).rank_seconds_per_waiting) == set(POLICIES)
