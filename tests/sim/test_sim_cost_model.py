"""The step-time fit: NNLS, recovering known coefficients from synthetic timings, held-out error, JSON."""
import numpy as np
import pytest
from conftest import known_execute

from sloserve.engine.cost_model import LinearCostModel, fit_with_holdout
from sloserve.engine.features import ExecuteFeatures, StepShape, token_knots
from sloserve.engine.nnls import nnls
from sloserve.sim.shapes import GridLimits, shape_of, step_grid


def test_nnls_meets_the_kkt_conditions():
    rng = np.random.default_rng(0)
    for _ in range(50):
        a = rng.random((40, 7))
        b = a @ np.maximum(rng.normal(size=7), 0) + rng.normal(size=40) * 0.05
        x = nnls(a, b)
        gradient = a.T @ (b - a @ x)
        assert (x >= 0).all()
        assert np.allclose(gradient[x > 0], 0, atol=1e-8)  # optimal on the free set
        assert (gradient[x == 0] <= 1e-8).all()  # no zero coefficient wants to grow


def test_fit_of_a_tall_problem_is_the_nnls_of_the_whole_problem():
    """The fit solves a small square problem with the same minimiser: KKT holds on the tall one."""
    rng = np.random.default_rng(4)
    x = rng.random((1100, 12)) * np.geomspace(1, 1e3, 12)
    x[:, 5] = 0.0  # a term no sample uses
    seconds = x @ np.maximum(rng.normal(size=12), 0) * 1e-4 + 1e-3
    coef = np.array(LinearCostModel.fit(tuple("abcdefghijkl"), x, seconds).coefficients)
    a = x / seconds[:, None]  # relative error: the fit's own weighting
    gradient = a.T @ (1 - a @ coef)
    assert (coef >= 0).all() and coef[5] == 0
    assert np.allclose(gradient[coef > 0] / np.linalg.norm(a, axis=0)[coef > 0], 0, atol=1e-8)
    assert (gradient[coef == 0] <= 1e-8 * np.maximum(np.linalg.norm(a, axis=0)[coef == 0], 1)).all()


def random_shapes(rng, n):
    """Random mixes of decodes and prefill chunks; whether a row samples is drawn independently so that
    the requests, samples and tokens terms can be told apart (in real decode-only steps they coincide)."""
    shapes = []
    for _ in range(n):
        decodes = int(rng.integers(0, 48))
        prefills = int(rng.integers(0 if decodes else 1, 4))
        new = [1] * decodes + [int(rng.integers(2, 300)) for _ in range(prefills)]
        ctx = [int(rng.integers(1, 1500)) for _ in range(decodes)] + [int(rng.integers(0, 2)) * int(rng.integers(1, 1500)) for _ in range(prefills)]
        shapes.append(StepShape(new, ctx, [bool(rng.random() < 0.6) for _ in new]))
    return shapes


def verification_shapes(rng, n):
    """Decodes beside 1-16 rows verifying 1-4 drafts each (a profile's engine run with speculation)."""
    shapes = []
    for _ in range(n):
        decodes, verifying = int(rng.integers(0, 32)), int(rng.integers(1, 17))
        drafts = [0] * decodes + [int(d) for d in rng.integers(1, 5, verifying)]
        shapes.append(StepShape([1 + d for d in drafts], [int(c) for c in rng.integers(1, 1500, len(drafts))],
                                [True] * len(drafts), drafts))
    return shapes


@pytest.mark.parametrize("noise, tolerance", [(0.0, 1e-6), (0.003, 0.05)])
def test_fit_recovers_known_coefficients(noise, tolerance):
    """Every coefficient the shapes reach within 5% when timings carry 0.3% noise (each grid timing is a median of
    repeats)."""
    rng = np.random.default_rng(1)
    grid = [shape_of(s) for s in step_grid(GridLimits(512, 64, 2048, 4096, 16))]
    shapes = grid + random_shapes(rng, 1000) + verification_shapes(np.random.default_rng(2), 200)
    features = ExecuteFeatures(token_knots(512))
    x = np.array([features(s) for s in shapes])
    truth = np.array([known_execute(features.knots)[t] for t in features.terms])
    seconds = x @ truth * (1 + noise * rng.standard_normal(len(shapes)))
    fitted = fit_with_holdout(features.terms, x, seconds)
    coefficients = np.array(fitted.model.coefficients)
    reached = x.any(axis=0)  # no shape here has 256 decode positions or more
    rel = np.abs(coefficients - truth)[reached] / truth[reached]
    assert rel.max() <= tolerance, dict(zip(np.array(features.terms)[reached], rel.round(4)))
    assert (coefficients[~reached] == 0).all()  # a term no step reached prices nothing
    assert fitted.heldout.median <= max(2 * noise, 1e-9)


def test_fit_under_one_percent_noise_gets_the_terms_that_matter():
    """Terms carrying >= 10% of the time stay within 5%; small, correlated terms (the three decode-attention
    terms) are only weakly determined one by one, though their sum is."""
    rng = np.random.default_rng(3)
    shapes = [shape_of(s) for s in step_grid(GridLimits(512, 64, 2048, 4096, 16))] + random_shapes(rng, 1000)
    features = ExecuteFeatures(token_knots(512))
    x = np.array([features(s) for s in shapes])
    truth = np.array([known_execute(features.knots)[t] for t in features.terms])
    seconds = x @ truth * (1 + 0.01 * rng.standard_normal(len(shapes)))
    fitted = fit_with_holdout(features.terms, x, seconds)
    rel = np.abs(np.array(fitted.model.coefficients) - truth) / truth
    share = (x * truth).mean(axis=0) / (x @ truth).mean()
    assert rel[share >= 0.10].max() <= 0.05
    assert fitted.heldout.median <= 0.015


def test_fit_keeps_unused_terms_at_zero_and_never_goes_negative():
    rng = np.random.default_rng(2)
    x = rng.random((60, 3)) * [1, 100, 10]
    seconds = x @ [2e-3, 1e-5, 0.0] + 1e-4  # third term does not matter; a constant offset the first absorbs
    model = LinearCostModel.fit(("a", "b", "c"), x, seconds)
    assert min(model.coefficients) >= 0


def test_model_round_trips_through_json():
    x = np.array([[1.0, float(n)] for n in range(1, 11)])
    fitted = fit_with_holdout(("step", "tokens"), x, x @ [1e-3, 1e-4])
    again = type(fitted).from_dict(fitted.to_dict())
    assert again.model.predict([1, 100]) == pytest.approx(fitted.model.predict([1, 100])) == pytest.approx(0.011)
    assert again.heldout.count == 2 and again.train.count == 8
