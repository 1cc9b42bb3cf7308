"""A serving run's calibrated step-time model saves as a profile that the simulator loads and predicts with."""
import pytest

from sloserve.config import EngineConfig
from sloserve.engine.policy import POLICIES
from sloserve.llm import build_engine
from sloserve.request import SamplingParams
from sloserve.sim.profile import Profile
from sloserve.sim.served_profile import served_profile


def test_profile_out_round_trips_the_calibrated_model(tiny_model_dir, tmp_path):
    config = EngineConfig(model=str(tiny_model_dir("smollm")), load_format="dummy", num_kv_blocks=64,
                          max_num_batched_tokens=32)
    engine = build_engine(config)
    with pytest.raises(ValueError, match="no steps"):
        served_profile(config, engine)
    for i in range(6):
        engine.add_request(str(i), list(range(3, 3 + 5 * (i + 1))), SamplingParams(max_tokens=6, ignore_eos=True))
    while engine.has_unfinished_requests():
        engine.step()
    predictor = engine.predictor
    assert predictor.num_refits >= 1  # the model that gets saved is a measured one, not the default
    path = tmp_path / "served.json"
    served_profile(config, engine).save(str(path))
    loaded = Profile.load(str(path))
    shapes = [shape for shape, _ in predictor.observations]
    assert [loaded.step_seconds(s) for s in shapes] == pytest.approx([predictor.step_seconds(s) for s in shapes])
    assert len(loaded.execute_timings) == predictor.num_observed and loaded.settings["source"] == "serve"
    assert loaded.execute.heldout.count == predictor.num_observed  # the prequential error travels with it
    # The scheduler's cost of ranking a queue is measured here too, so a simulation of any policy charges it
    # (the serving run's steps saw only its own policy's queues).
    assert set(loaded.rank_seconds_per_waiting) == set(POLICIES)
    assert all(seconds >= 0 for seconds in loaded.rank_seconds_per_waiting.values())
