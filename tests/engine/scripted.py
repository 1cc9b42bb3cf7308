"""Scripted seams for policy tests: a step-time model with known costs and a clock that stands still."""
from sloserve.engine.features import StepShape


class LinearSteps:
    """A step costs `fixed` seconds plus `per_token` per batched token: easy to work out by hand."""

    def __init__(self, fixed: float = 0.010, per_token: float = 0.001) -> None:
        self.fixed = fixed
        self.per_token = per_token

    def step_seconds(self, shape: StepShape) -> float:
        return self.fixed + self.per_token * sum(shape.new_tokens)


class ManualClock:
    def __init__(self, t: float = 0.0) -> None:
        self.t = t

    def now(self) -> float:
        return self.t
