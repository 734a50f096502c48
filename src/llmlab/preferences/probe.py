"""Standardised Ridge probes: fitting along an alpha path, saving without pickle, scoring.

A probe is `score(x) = ((x - mean) / scale) @ coef + intercept`. It is saved in the project's
one tensor format (`llmlab.tensorfile`): coef, mean and scale in `raw_L015.safetensors`, the
intercept and provenance (model, layer, target, alpha) in the `raw_L015.json` sidecar, so it
loads anywhere without pickle or llmlab:

    from llmlab.preferences.probe import load_probe
    probe = load_probe("models/preferences/probes/raw_L015.safetensors")
    utilities = probe.score(activations)          # [n, hidden] -> [n]
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llmlab.io import DataError

FORMAT = "llmlab.preferences.probe/v2"
ARRAYS = ("coef", "mean", "scale")
SUFFIX = ".safetensors"


@dataclass
class Probe:
    """A linear probe on standardised activations."""

    coef: np.ndarray
    intercept: float
    mean: np.ndarray
    scale: np.ndarray
    alpha: float
    layer: int
    target: str  # "raw" or "topic_demeaned"
    model: str
    meta: dict[str, Any] = field(default_factory=dict)

    def score(self, x: np.ndarray) -> np.ndarray:
        """Return the probe's prediction for each row of x [n, hidden]."""
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.coef.size:
            raise DataError(f"probe expects [n, {self.coef.size}] activations, got {list(x.shape)}")
        return ((x - self.mean) / self.scale) @ self.coef + self.intercept

    def direction(self) -> np.ndarray:
        """Return the weight vector in raw activation space (coef / scale)."""
        return self.coef / self.scale


def score(probe: Probe, x: np.ndarray) -> np.ndarray:
    """Return probe predictions for activations x (same as probe.score)."""
    return probe.score(x)


def save_probe(path: str | Path, probe: Probe) -> None:
    """Write the probe: coef/mean/scale as safetensors (float64), the rest as its JSON sidecar."""
    from llmlab.tensorfile import save_tensors

    meta = {k: v for k, v in asdict(probe).items() if k not in ARRAYS}
    save_tensors(
        Path(path).with_suffix(SUFFIX),
        {k: getattr(probe, k) for k in ARRAYS},
        meta,
        kind=FORMAT,
        dtype=np.float64,
    )


def load_probe(path: str | Path) -> Probe:
    """Return a saved probe (either of its two files); DataError naming the file on a mismatch."""
    from llmlab.tensorfile import load_tensors

    arrays, doc = load_tensors(Path(path).with_suffix(SUFFIX), kind=FORMAT, required=ARRAYS)
    try:
        coef, mean, scale = (np.asarray(arrays[k], dtype=np.float64) for k in ARRAYS)
        probe = Probe(
            coef,
            float(doc["intercept"]),
            mean,
            scale,
            float(doc["alpha"]),
            int(doc["layer"]),
            str(doc["target"]),
            str(doc["model"]),
            dict(doc.get("meta") or {}),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(f"{path}: malformed probe ({type(e).__name__}: {e})") from None
    if not (coef.shape == mean.shape == scale.shape) or coef.ndim != 1:
        raise DataError(f"{path}: coef, mean and scale must be vectors of one length")
    return probe


@dataclass(frozen=True)
class Scaler:
    """Per-feature standardisation fitted on training rows."""

    mean: np.ndarray
    scale: np.ndarray

    @classmethod
    def fit(cls, x: np.ndarray) -> Scaler:
        """Return the scaler of x (constant features get scale 1)."""
        sd = x.std(axis=0)
        return cls(x.mean(axis=0), np.where(sd > 1e-12, sd, 1.0))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return (x - self.mean) / self.scale


class RidgePath:
    """Ridge solutions for many alphas from one SVD of the standardised, centred design.

    Hand-written rather than sklearn's RidgeCV: the probes stage reuses one decomposition for
    every target (raw, topic-demeaned, shuffled) and every alpha of the path, which RidgeCV
    cannot (it refits per target); the held-one-topic-out fit uses RidgeCV (`hoo.py`).
    """

    def __init__(self, x: np.ndarray, y: np.ndarray) -> None:
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"{x.shape[0]} rows of features for {y.shape[0]} targets")
        if x.shape[0] < 3:
            raise ValueError(f"a probe needs at least 3 training rows, got {x.shape[0]}")
        self.scaler = Scaler.fit(x)
        xs = self.scaler(x)
        self.u, self.s, vt = np.linalg.svd(xs, full_matrices=False)
        self.v = vt.T
        self._set_target(y)

    def _set_target(self, y: np.ndarray) -> None:
        self.y_mean = float(y.mean())
        self.uty = self.u.T @ (y - self.y_mean)
        self.y = y

    def with_target(self, y: np.ndarray) -> RidgePath:
        """Return the path of the same features for other targets, reusing the decomposition."""
        if y.shape[0] != self.y.shape[0]:
            raise ValueError(f"{self.y.shape[0]} rows of features for {y.shape[0]} targets")
        out = copy.copy(self)
        out._set_target(y)
        return out

    def coef(self, alpha: float) -> np.ndarray:
        """Return the standardised-space coefficients for one alpha."""
        return self.v @ (self.s / (self.s**2 + alpha) * self.uty)

    def predict(self, x: np.ndarray, alpha: float) -> np.ndarray:
        """Return predictions for raw features x at one alpha."""
        return self.scaler(x) @ self.coef(alpha) + self.y_mean

    def loo_predictions(self, alpha: float) -> np.ndarray:
        """Return the closed-form leave-one-out prediction of every training row at one alpha.

        Standardisation stays fitted on all rows (the usual closed form; its effect on the
        left-out row is of order 1/n).
        """
        shrink = self.s**2 / (self.s**2 + alpha)
        fitted = self.u @ (shrink * self.uty) + self.y_mean
        h = (self.u**2) @ shrink + 1.0 / self.y.size  # hat diagonal, intercept included
        return self.y - (self.y - fitted) / np.clip(1 - h, 1e-9, None)

    def gcv_alpha(self, alphas: Sequence[float]) -> float:
        """Return the alpha with the smallest leave-one-out error (closed form for ridge)."""
        best, best_err = float(alphas[0]), math.inf
        for a in alphas:
            err = float(np.mean((self.y - self.loo_predictions(a)) ** 2))
            if err < best_err:
                best, best_err = float(a), err
        return best

    def probe(self, alpha: float, layer: int, target: str, model: str, **meta: Any) -> Probe:
        """Return the probe at one alpha."""
        return Probe(
            self.coef(alpha),
            self.y_mean,
            self.scaler.mean.copy(),
            self.scaler.scale.copy(),
            float(alpha),
            int(layer),
            target,
            model,
            dict(meta),
        )


def alpha_grid(lo: float, hi: float, n: int) -> list[float]:
    """Return n log-spaced alphas from lo to hi."""
    return [float(a) for a in np.logspace(math.log10(lo), math.log10(hi), n)]
