"""The held-one-topic-out ridge (sklearn RidgeCV) against leave-one-out refits done by hand."""

from __future__ import annotations

import numpy as np
import pytest

from llmlab.preferences.hoo import fit_loo_ridge
from llmlab.preferences.probe import RidgePath


def _loo_by_refit(x: np.ndarray, y: np.ndarray, alpha: float) -> np.ndarray:
    """Leave-one-out predictions by n explicit ridge refits (scaler fitted on all rows)."""
    sd = x.std(axis=0)
    xs = (x - x.mean(axis=0)) / np.where(sd > 1e-12, sd, 1.0)
    out = np.empty(y.size)
    for k in range(y.size):
        keep = np.arange(y.size) != k
        xm, ym = xs[keep].mean(axis=0), y[keep].mean()
        a = xs[keep] - xm
        beta = np.linalg.solve(a.T @ a + alpha * np.eye(x.shape[1]), a.T @ (y[keep] - ym))
        out[k] = (xs[k] - xm) @ beta + ym
    return out


@pytest.mark.parametrize(("n", "p"), [(15, 4), (30, 60)])
def test_alpha_and_loo_predictions_equal_explicit_refits(n: int, p: int) -> None:
    rng = np.random.default_rng(n + p)
    x = rng.normal(size=(n, p)) * rng.uniform(0.1, 10.0, size=p) + rng.normal(size=p)
    x[:, 1] = 3.0  # a constant feature: scale 1, as in the probes
    y = 0.7 * x[:, 0] + rng.normal(size=n)
    alphas = [0.01, 1.0, 30.0, 1e4]
    loo = {a: _loo_by_refit(x, y, a) for a in alphas}
    errors = {a: float(np.mean((y - loo[a]) ** 2)) for a in alphas}
    want = min(alphas, key=lambda a: errors[a])
    probe = fit_loo_ridge(x.astype(np.float32), y, alphas)
    assert probe.alpha == want
    assert probe.loo == pytest.approx(loo[want], abs=1e-4)  # float32 features
    exact = fit_loo_ridge(x, y, alphas)
    assert exact.loo == pytest.approx(loo[want], abs=1e-9)


def test_predictions_equal_the_probe_path_of_the_probes_stage() -> None:
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(40, 8)), rng.normal(size=40)
    alphas = [0.1, 1.0, 10.0, 100.0]
    probe = fit_loo_ridge(x, y, alphas)
    path = RidgePath(x, y)
    assert probe.alpha == path.gcv_alpha(alphas)
    x_new = rng.normal(size=(6, 8))
    assert probe.model.predict(x_new) == pytest.approx(path.predict(x_new, probe.alpha), abs=1e-10)


def test_too_few_rows_is_one_line_error() -> None:
    with pytest.raises(ValueError, match="at least 3 training rows, got 2"):
        fit_loo_ridge(np.ones((2, 3)), np.array([1.0, 2.0]), [1.0])
