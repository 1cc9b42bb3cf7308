"""The step-time predictor: learns measured steps online, keeps its start where nothing was measured, reports its error."""
import random
import statistics

import pytest

from sloserve.engine.cost import StepCostModel, StepPredictor, prefill_chunk, rate_floor
from sloserve.engine.cost_model import LinearCostModel
from sloserve.engine.engine import LLMEngine
from sloserve.engine.features import StepShape
from sloserve.engine.scheduler import SchedulerConfig
from sloserve.request import SamplingParams

from .fakes import CountingExecutor, TickingClock
from .scripted import ManualClock


def true_seconds(shape: StepShape) -> float:
    return 0.004 + 0.0002 * sum(shape.new_tokens) + 1e-6 * sum(shape.contexts)


def decode_heavy_steps(rng, n, prefills=True):
    for _ in range(n):
        b = rng.randint(1, 24)
        new, ctx = [1] * b, [rng.randint(8, 400) for _ in range(b)]
        if prefills and rng.random() < 0.3:
            new.append(rng.randint(2, 200))
            ctx.append(0)
        yield StepShape(new, ctx, [True] * len(new))


def test_calibration_from_the_default_reaches_the_measured_times():
    rng = random.Random(0)
    predictor = StepPredictor(StepCostModel.default(256))
    shapes = list(decode_heavy_steps(rng, 600))
    before = [predictor.step_seconds(s) / true_seconds(s) for s in shapes[:50]]
    assert min(before) > 2  # the default is conservative: slower than this machine
    for s in shapes:
        predictor.observe(s, true_seconds(s) * rng.uniform(0.98, 1.02))
    assert predictor.num_refits > 5
    recent = StepPredictor(predictor.model, calibrate=False)
    for s in shapes[-200:]:
        recent.observe(s, true_seconds(s))
    assert recent.error().median < 0.03 and recent.error().count == 200
    assert predictor.error().count == 600 and predictor.error().max > 1  # the early, default-based predictions


def test_where_no_step_was_measured_the_start_models_shape_holds_at_the_measured_speed():
    """The conservative default is ~10x slower than this 'machine': where steps were measured the fit follows
    them; where none were (a full-budget prefill), the default's shape holds, scaled by how the measured steps
    compare with it, so one unseen step size does not make every policy and admission see a slow machine."""
    start = StepCostModel.default(256)
    predictor = StepPredictor(start)
    shapes = list(decode_heavy_steps(random.Random(1), 300, prefills=False))  # at most 24 tokens a step
    for s in shapes:
        predictor.observe(s, true_seconds(s))
    scale = statistics.median(true_seconds(s) / start.step_seconds(s) for s in shapes[-predictor.observations.maxlen:])
    big = StepShape([256], [0], [True])
    assert scale < 0.2
    # The refit blends the scaled start with the measured small steps' slope: near the scaled start, within
    # 2x of the truth (the unscaled start, 0.58 s, is 10x the true 0.055 s).
    assert 1 / 1.5 < predictor.step_seconds(big) / (scale * start.step_seconds(big)) < 1.5
    assert 0.5 < predictor.step_seconds(big) / true_seconds(big) < 2
    small = StepShape([1] * 8, [100] * 8, [True] * 8)
    assert predictor.step_seconds(small) == pytest.approx(true_seconds(small), rel=0.05)


def test_the_engine_feeds_every_step_to_its_predictor():
    engine = LLMEngine(CountingExecutor(), SchedulerConfig(block_size=4), max_model_len=64, vocab_size=100,
                       clock=TickingClock())
    engine.add_request("r", [1, 2, 3], SamplingParams(max_tokens=5))
    steps = 0
    while engine.has_unfinished_requests():
        engine.step()
        steps += 1
    assert engine.predictor.num_observed == steps == 5
    (shape, seconds), *_ = engine.predictor.observations
    assert shape == StepShape([3], [0], [True]) and seconds == pytest.approx(0.002)  # the clock ticks at the start, after execute, at the end


def test_time_between_busy_steps_is_part_of_the_next_steps_cost_but_idle_time_is_not():
    """A server delivers a step's tokens and takes new requests before its next step: that time is what a
    step costs in serving, so the predictor learns it; time with nothing to run is nobody's step."""
    clock = ManualClock(0.0)

    class OneMillisecondSteps(CountingExecutor):
        def execute(self, plan):
            clock.t += 0.001
            return super().execute(plan)

    engine = LLMEngine(OneMillisecondSteps(), SchedulerConfig(block_size=4), max_model_len=64, vocab_size=100,
                       clock=clock)
    engine.add_request("r", [1, 2, 3], SamplingParams(max_tokens=3))
    engine.step()
    clock.t += 0.004  # the driver works between two steps while "r" still runs
    engine.step()
    engine.step()
    assert not engine.has_unfinished_requests()
    clock.t += 5.0  # idle
    engine.add_request("q", [4, 5], SamplingParams(max_tokens=1))
    engine.step()
    assert [seconds for _, seconds in engine.predictor.observations] == pytest.approx([0.001, 0.005, 0.001, 0.001])


def test_a_model_that_prices_steps_at_zero_still_predicts_time_and_chunks_are_cut_without_error():
    """A non-negative fit can set every term a shape uses to zero; the scheduler divides by predicted step times."""
    default = StepCostModel.default(256)
    zero = StepCostModel(default.knots, [0.0] * len(default.coefficients))
    empty = StepShape([], [], [])
    assert zero.step_seconds(StepShape([64], [0], [True])) > 0
    assert 1 <= rate_floor(zero, empty, 0, 256, 1000.0) <= 256
    assert prefill_chunk(zero, empty, 0, 256, 16, 0.025, min_rate=1000.0) == 256


def test_a_verification_is_priced_as_the_decode_rows_the_runner_computes_it_as():
    """A row verifying k drafts is k + 1 decode positions to the runner (decode attention, the decode matmul kernel,
    logits at each); priced as a prefill chunk on cached context, its cost came from prefill steps' coefficients."""
    features = StepCostModel.default(256).features.execute
    terms = features.terms
    verify = features(StepShape([5, 1], [40, 70], [True, True], spec_tokens=[4, 0]))
    decodes = features(StepShape([1] * 6, [40, 41, 42, 43, 44, 70], [True] * 6))
    differ = {t for t, a, b in zip(terms, verify, decodes) if a != b}
    assert differ == {"requests"}  # one request's rows, not six requests
    chunk = features(StepShape([5, 1], [40, 70], [True, True]))  # the same tokens as a prompt chunk
    assert chunk[terms.index("prefill_chunks")] == 1 and verify[terms.index("prefill_chunks")] == 0


def split_kernel_seconds(shape: StepShape) -> float:
    """A CPU step as the runner computes it: 1 ms, 0.25 ms a decode position (decode rows and verifications, the
    row-streaming kernel) and 10 us a prompt token (a GEMM), whatever else the step holds."""
    decode = sum(n for n, d in zip(shape.new_tokens, shape.spec_tokens) if n == 1 or d)
    return 0.001 + 0.00025 * decode + 0.00001 * (sum(shape.new_tokens) - decode)


def test_decode_positions_and_prompt_tokens_are_priced_apart_as_the_runner_computes_them():
    # Fitted on decode steps, prompt chunks, decodes beside chunks and verifications alone, the model prices what it
    # never saw: a verification beside a chunk costs what its positions cost without it.
    rng = random.Random(0)
    features = StepCostModel.default(512).features.execute
    shapes = [StepShape([1 + k] * 16, [100] * 16, [True] * 16, [k] * 16) for k in range(1, 5)]
    for _ in range(300):
        rows, chunk = rng.randint(1, 24), rng.choice([0, 0, rng.randint(2, 500)])
        new, ctx = [1] * rows + ([chunk] if chunk else []), [100] * rows + ([0] if chunk else [])
        shapes.append(StepShape(new, ctx, [True] * len(new)))
    model = LinearCostModel.fit(features.terms, [features(s) for s in shapes], [split_kernel_seconds(s) for s in shapes])
    verify = StepShape([5] * 16 + [448], [100] * 16 + [0], [True] * 17, [4] * 16 + [0])
    assert model.predict(features(verify)) == pytest.approx(split_kernel_seconds(verify), rel=0.02)
    alone = StepShape([5] * 16, [100] * 16, [True] * 16, [4] * 16)
    added = model.predict(features(verify)) - model.predict(features(StepShape([1] * 16 + [448], [100] * 16 + [0],
                                                                             [True] * 17)))
    assert added == pytest.approx(split_kernel_seconds(alone) - split_kernel_seconds(StepShape([1] * 16, [100] * 16,
                                                                                             [True] * 16)), rel=0.05)


def test_a_verification_larger_than_any_step_measured_is_priced_on_the_line_the_measured_decodes_draw():
    # A server at 16-32 concurrent measures 16-32 decode positions (and 32 verifying one draft each); a verification
    # of 4 drafts on 32 rows is 160. Where the table was not measured it runs straight on from where it was: priced
    # in the default model's shape instead (scaled to the measured speed), it came out 35% cheap, and adaptive
    # verified on it until a refit had measured it.
    def seconds(shape):
        return 0.0005 + 0.00042 * sum(shape.new_tokens) + 1e-7 * sum(shape.contexts)

    predictor, rng = StepPredictor(StepCostModel.default(512)), random.Random(0)
    for _ in range(600):
        rows = rng.choice([14, 15, 16, 16, 31, 32])
        k = rng.choice([0, 0, 0, 1]) if rows <= 16 else 0
        shape = StepShape([1 + k] * rows, [rng.randint(50, 300) for _ in range(rows)], [True] * rows, [k] * rows)
        predictor.observe(shape, seconds(shape) * rng.uniform(0.95, 1.05))
    for rows, k in ((32, 3), (32, 4), (64, 0)):
        shape = StepShape([1 + k] * rows, [150] * rows, [True] * rows, [k] * rows)
        assert predictor.step_seconds(shape) == pytest.approx(seconds(shape), rel=0.05)


def test_a_plans_shape_counts_its_draft_tokens():
    from sloserve.engine.scheduler import ScheduledRequest, SchedulerOutput
    params = SamplingParams(max_tokens=8)
    plan = SchedulerOutput([ScheduledRequest("a", [1, 2, 3], 10, 3, True, [0], params, spec_token_ids=[2, 3]),
                            ScheduledRequest("b", [4], 7, 1, True, [1], params)])
    shape = StepShape.of(plan)
    assert shape.spec_tokens == [2, 0]
    assert StepShape.from_dict(shape.to_dict()) == shape
    assert StepShape.from_dict({"new_tokens": [3], "contexts": [0], "samples": [True]}).spec_tokens == [0]


def test_a_prefill_chunk_is_sized_beside_the_steps_verifications_as_verifications():
    class Recording:
        shapes: list = []

        def step_seconds(self, shape):
            self.shapes.append(shape)
            return 0.001 * sum(shape.new_tokens)

    model = Recording()
    prefill_chunk(model, StepShape([5, 1], [40, 70], [True, True], [4, 0]), 0, 100, 8, 0.05)
    assert model.shapes and all(s.spec_tokens == [4, 0, 0] for s in model.shapes)
    with pytest.raises(ValueError, match="2 draft counts for 3 rows"):
        StepShape([5, 1, 1], [40, 70, 9], [True] * 3, [4, 0])
