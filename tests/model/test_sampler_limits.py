"""The sampler never yields NaN or an empty candidate set; parameters are refused at float32 precision."""
import math

import pytest
import torch

from sloserve.model.sampler import Sampler, SamplingError
from sloserve.request import SamplingParams

LOGITS = torch.tensor([[0.0, 3.0, 2.9, -1.0, 2.8], [1.0, 0.5, 4.0, -2.0, 0.0]])


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1e-30),            # logits / T overflowed to inf, then NaN
    SamplingParams(temperature=2.0**-126),        # the smallest temperature allowed (normal float32)
    SamplingParams(temperature=1.0, top_p=1e-40),  # a float32 subnormal: the top token still stays
    SamplingParams(temperature=1.0, top_p=1e-30, top_k=1),
    SamplingParams(temperature=3e38),
], ids=["tiny-temperature", "min-normal-float32-temperature", "subnormal-top-p", "top-p-and-top-k", "huge-temperature"])
def test_extreme_but_valid_parameters_sample_a_real_token(params):
    sampler = Sampler(seed=0)
    tokens = sampler.sample(LOGITS, ["a", "b"], [params, params])
    assert all(0 <= t < LOGITS.shape[1] for t in tokens)
    if params.temperature < 1e-20 or params.top_p < 1e-20:
        assert tokens == [1, 2]  # only the most likely token is left


def test_top_p_that_rounds_to_zero_in_float32_still_keeps_the_top_token():
    # Bypass validation to show the sampler's own guard: 1e-46 is 0 in float32.
    params = SamplingParams(temperature=1.0)
    params.top_p = 1e-46
    assert Sampler(seed=0).sample(LOGITS, ["a", "b"], [params, params]) == [1, 2]


def test_subnormal_temperatures_still_sample_the_top_token():
    # Bypass validation: on CUDA, x / T is x * (1 / T), and 1 / T is inf for these (0 * inf = NaN).
    for temperature in (1e-39, 1.4e-45):
        params = SamplingParams(temperature=1.0)
        params.temperature = temperature
        assert Sampler(seed=0).sample(LOGITS, ["a", "b"], [params, params]) == [1, 2]


def test_non_finite_logits_are_repaired_or_blamed_on_their_row():
    logits = LOGITS.clone()
    logits[0, 3] = float("nan")
    logits[1, 0] = float("inf")
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.0)]
    assert Sampler(seed=0).sample(logits, ["a", "b"], params) == [1, 0]
    sampled = Sampler(seed=0).sample(logits, ["a", "b"], [SamplingParams(temperature=1.0)] * 2)
    assert sampled[1] == 0 and sampled[0] != 3
    dead = LOGITS.clone()
    dead[1] = float("nan")
    with pytest.raises(SamplingError) as info:
        Sampler(seed=0).sample(dead, ["a", "b"], [SamplingParams(temperature=1.0)] * 2)
    assert info.value.request_id == "b"


@pytest.mark.parametrize("field, value, needle", [
    ("top_p", 1e-46, "top_p"),
    ("top_p", math.nan, "top_p"),
    ("temperature", 1e-46, "temperature"),
    ("temperature", 1e-39, "temperature"),  # 1/T overflows float32: CUDA's scalar divide would give NaN
    ("temperature", 1e39, "temperature"),
    ("temperature", math.inf, "temperature"),
    ("temperature", math.nan, "temperature"),
    ("seed", 2**63, "seed"),
    ("seed", -(2**63) - 1, "seed"),
    ("top_k", 10**30, "top_k"),
    ("max_tokens", True, "max_tokens"),
    ("temperature", 10**400, "temperature"),
])
def test_values_the_sampler_cannot_honour_are_refused_by_name(field, value, needle):
    with pytest.raises(ValueError, match=needle):
        SamplingParams(**{field: value})


def test_int64_seed_bounds_are_accepted_and_sample():
    for seed in (2**63 - 1, -(2**63)):
        params = SamplingParams(temperature=1.0, seed=seed)
        assert 0 <= Sampler(seed=0).sample(LOGITS[:1], ["a"], [params])[0] < 5
