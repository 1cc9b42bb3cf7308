"""A linear step-time model with non-negative coefficients: fit, predict, errors, JSON."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from sloserve.engine.nnls import nnls


@dataclass(slots=True)
class FitError:
    """Absolute relative errors |predicted - measured| / measured over a set of shapes."""

    count: int
    mean: float
    median: float
    max: float

    @classmethod
    def of(cls, predicted: np.ndarray, measured: np.ndarray) -> FitError:
        if len(measured) == 0:
            return cls(0, float("nan"), float("nan"), float("nan"))
        rel = np.abs(predicted - measured) / measured
        return cls(len(rel), float(rel.mean()), float(np.median(rel)), float(rel.max()))

    def to_dict(self) -> dict:
        return {"count": self.count, "mean_abs_rel": self.mean, "median_abs_rel": self.median, "max_abs_rel": self.max}

    @classmethod
    def from_dict(cls, d: dict) -> FitError:
        return cls(d["count"], d["mean_abs_rel"], d["median_abs_rel"], d["max_abs_rel"])


@dataclass(slots=True)
class LinearCostModel:
    """seconds = sum(coefficient_i * feature_i); every coefficient >= 0 so no term can make a step cheaper."""

    terms: tuple[str, ...]
    coefficients: list[float]

    def predict(self, features: Sequence[float]) -> float:
        # Plain Python: the simulator calls this once per step, and numpy's per-call cost would dominate.
        return sum(c * f for c, f in zip(self.coefficients, features))

    def predict_many(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x, float) @ np.asarray(self.coefficients)

    @classmethod
    def fit(cls, terms: Sequence[str], x: np.ndarray, seconds: np.ndarray,
            weights: np.ndarray | None = None, penalty: np.ndarray | None = None) -> LinearCostModel:
        """Non-negative least squares on *relative* error, so a 5 ms decode step counts as much as a
        2 s prefill step (decodes set TPOT; an absolute fit would sacrifice them to the big steps).
        `weights` scale each sample's say (the online refit gives its prior samples less); `penalty` rows
        r add ||r . coefficients||^2 (in the same relative units) to what is minimised."""
        x, y = np.asarray(x, float), np.asarray(seconds, float)
        if x.ndim != 2 or x.shape != (len(y), len(terms)):
            raise ValueError(f"features must be {len(y)} x {len(terms)}, got {x.shape}")
        if (y <= 0).any():
            raise ValueError("measured times must be positive")
        w = np.ones(len(y)) if weights is None else np.asarray(weights, float)
        weighted = x * (w / y)[:, None]
        if penalty is not None:
            weighted, w = np.vstack([weighted, penalty]), np.concatenate([w, np.zeros(len(penalty))])
        # Unit columns keep the active-set solver well conditioned; unused terms (all zero) stay zero.
        scale = np.linalg.norm(weighted, axis=0)
        scale[scale == 0] = 1.0
        a = weighted / scale
        if a.shape[0] > a.shape[1]:
            a, w = _square(a, w)
        coef = nnls(a, w) / scale
        return cls(tuple(terms), [float(c) for c in coef])

    def errors(self, x: np.ndarray, seconds: np.ndarray) -> FitError:
        return FitError.of(self.predict_many(x), np.asarray(seconds, float))

    def to_dict(self) -> dict:
        return {"terms": list(self.terms), "coefficients": self.coefficients}

    @classmethod
    def from_dict(cls, d: dict) -> LinearCostModel:
        return cls(tuple(d["terms"]), [float(c) for c in d["coefficients"]])


@dataclass(slots=True)
class FittedModel:
    """A model fitted on every sample, with the error of a fit that had every k-th sample held out."""

    model: LinearCostModel
    train: FitError
    heldout: FitError
    holdout_every: int

    def to_dict(self) -> dict:
        return {**self.model.to_dict(), "holdout_every": self.holdout_every,
                "train_error": self.train.to_dict(), "heldout_error": self.heldout.to_dict()}

    @classmethod
    def from_dict(cls, d: dict) -> FittedModel:
        return cls(LinearCostModel.from_dict(d), FitError.from_dict(d["train_error"]),
                   FitError.from_dict(d["heldout_error"]), d["holdout_every"])


def fit_with_holdout(terms: Sequence[str], x: np.ndarray, seconds: np.ndarray, every: int = 5) -> FittedModel:
    """Held-out error from a fit on the other samples; the stored coefficients use all of them."""
    x, y = np.asarray(x, float), np.asarray(seconds, float)
    held = np.zeros(len(y), dtype=bool)
    held[every - 1 :: every] = True
    if held.all() or not held.any():
        raise ValueError(f"need at least {every} samples to hold out every {every}th")
    partial = LinearCostModel.fit(terms, x[~held], y[~held])
    full = LinearCostModel.fit(terms, x, y)
    return FittedModel(full, partial.errors(x[~held], y[~held]), partial.errors(x[held], y[held]), every)


def _square(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A square (r, c) with ||r x - c||^2 = ||a x - b||^2 + a constant, so NNLS solves the small problem.

    From the Gram matrix's eigen-decomposition (a'a = r'r). The engine refits every 32 steps on its step
    thread, and with torch loaded, OpenBLAS's threaded routines on these shapes (the tall QR, or a'a as a
    matrix product) took 15-450 ms: a stall in the middle of serving. einsum computes a'a without BLAS
    (0.2 ms for 1,100 x 22), and the rest is a 22 x 22 eigh.
    """
    lam, v = np.linalg.eigh(np.einsum("ij,ik->jk", a, a))
    keep = lam > lam.max(initial=0.0) * 1e-12  # directions a never reaches add nothing to ||a x - b||
    root = np.sqrt(lam[keep])
    return (v[:, keep] * root).T, (v[:, keep].T @ (a.T @ b)) / root
