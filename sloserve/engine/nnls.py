"""Non-negative least squares (Lawson and Hanson's active-set method), so numpy alone fits the cost model."""
from __future__ import annotations

import numpy as np


def nnls(a: np.ndarray, b: np.ndarray, max_iter: int | None = None) -> np.ndarray:
    """argmin ||a x - b|| subject to x >= 0."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    m, n = a.shape
    tol = 10 * np.finfo(float).eps * np.abs(a).sum(axis=0).max(initial=0.0) * max(m, n)
    x = np.zeros(n)
    passive = np.zeros(n, dtype=bool)
    gradient = a.T @ b
    for _ in range(max_iter or 3 * n + 10):
        free = ~passive & (gradient > tol)
        if not free.any():
            break
        passive[np.argmax(np.where(free, gradient, -np.inf))] = True
        while True:
            z = np.zeros(n)
            z[passive] = np.linalg.lstsq(a[:, passive], b, rcond=None)[0]
            if (z[passive] > tol).all():
                x = z
                break
            # Step from x towards z until the first passive coefficient hits zero, then drop it.
            hit = passive & (z <= tol)
            gap = x[hit] - z[hit]
            alpha = np.min(np.where(gap > 0, x[hit] / np.where(gap > 0, gap, 1.0), 0.0))
            x = x + alpha * (z - x)
            passive &= x > tol
            x[~passive] = 0.0
        gradient = a.T @ (b - a @ x)
    return x
