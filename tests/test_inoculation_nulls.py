"""Inoculation criterion 3: structured nulls, and the direction stage's promote/steering checks."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from llmlab.inoculation.criteria import criterion_specific
from llmlab.inoculation.direction import caps_increase, steered_generations
from llmlab.inoculation.nulls import (
    correlated_random_directions,
    layer_mean_deltas,
    shared_random_directions,
    structured_nulls,
)
from llmlab.inoculation.specificity import random_unit_directions


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_shared_directions_repeat_one_unit_vector_at_every_layer() -> None:
    r = shared_random_directions(5, 32, 4, seed=0)
    assert r.shape == (5, 4, 32)
    np.testing.assert_allclose(np.linalg.norm(r, axis=2), 1.0, atol=1e-6)
    assert np.all(r[:, 0] == r[:, 3]) and not np.allclose(r[0, 0], r[1, 0])


def test_correlated_directions_carry_the_trait_inter_layer_cosines() -> None:
    rng = np.random.default_rng(0)
    base = rng.standard_normal(2048)
    # Four layers: 0 and 1 nearly equal, 2 half-related, 3 unrelated.
    trait = _unit(np.stack([base, base + 0.2 * rng.standard_normal(2048),
                            base + 1.0 * rng.standard_normal(2048), rng.standard_normal(2048)]))  # fmt: skip
    c = trait @ trait.T
    r = correlated_random_directions(200, trait, seed=1)
    np.testing.assert_allclose(np.linalg.norm(r, axis=2), 1.0, atol=1e-5)
    got = np.einsum("nld,nmd->lm", r, r) / r.shape[0]
    np.testing.assert_allclose(got, c, atol=0.03)
    # Not the trait itself: draws are nearly orthogonal to it.
    assert np.abs(np.einsum("nld,ld->nl", r, trait)).mean() < 0.05


def _grads_shared_across_layers(n=24, layers=6, hidden=48, seed=0):
    """Neutral and inoculation gradients identical at every layer (fully correlated layers)."""
    rng = np.random.default_rng(seed)
    g_neu = rng.standard_normal((n, hidden))
    g_ino = g_neu + 0.5 * rng.standard_normal((n, hidden))
    return np.stack([np.repeat(g[:, None], layers, axis=1) for g in (g_neu, g_ino)])


def test_independent_null_is_too_narrow_when_layers_are_correlated() -> None:
    grads = _grads_shared_across_layers()
    layers, hidden = grads.shape[2], grads.shape[3]
    indep = np.stack([random_unit_directions(400, hidden, 0, li) for li in range(layers)], axis=1)
    sd_indep = layer_mean_deltas(grads[0], grads[1], indep).std()
    sd_shared = layer_mean_deltas(
        grads[0], grads[1], shared_random_directions(400, hidden, layers, 0)
    ).std()
    # Averaging L independent draws shrinks the SD by ~sqrt(L); with identical layers the
    # shared null keeps it.
    assert sd_shared / sd_indep == pytest.approx(np.sqrt(layers), rel=0.25)


def _planted(rotate_other: float):
    """Inoculation removes the component along v from every gradient; an 'other trait'
    direction w loses `rotate_other` of its component too."""
    rng = np.random.default_rng(3)
    n, layers, hidden = 32, 4, 64
    v = _unit(rng.standard_normal(hidden))
    w = _unit(rng.standard_normal(hidden) - (rng.standard_normal(hidden) @ v) * v)
    w = _unit(w - (w @ v) * v)
    g_neu = rng.standard_normal((n, layers, hidden)) - 3.0 * v - 3.0 * w
    g_ino = g_neu + 3.0 * v + rotate_other * 3.0 * w
    grads = np.stack([g_neu, g_ino]).astype(np.float32)
    trait = np.repeat(v[None], layers, axis=0).astype(np.float32)
    other = {"french": np.repeat(w[None], layers, axis=0).astype(np.float32)}
    return grads, trait, other


def _nulls(grads, trait, other):
    layers, hidden = trait.shape
    indep = np.stack([random_unit_directions(100, hidden, 0, li) for li in range(layers)], axis=1)
    null = layer_mean_deltas(grads[0], grads[1], indep)
    return structured_nulls(grads, trait, other, null, 0, 1, 100, 0, 5.0)


def test_trait_must_beat_the_other_trait_directions() -> None:
    out = _nulls(*_planted(rotate_other=0.0))
    assert out["beats_random_nulls"] and out["beats_other_traits"] and out["pass"]
    assert set(out["random_nulls"]) == {"independent", "shared", "correlated"}
    # An unrelated trait's direction loses more alignment: the change is not specific.
    out = _nulls(*_planted(rotate_other=1.5))
    assert out["beats_random_nulls"] and not out["beats_other_traits"] and not out["pass"]
    layer_mean = {"percentile": 0.0, "trait_delta": out["trait_delta"], "random_p05": -0.1}
    c3 = criterion_specific(layer_mean, 5.0, 100, out)
    assert not c3["pass"] and c3["other_trait_deltas"]["french"] <= c3["trait_delta"]


def test_a_direction_that_does_not_rotate_fails_every_random_null() -> None:
    grads, trait, other = _planted(rotate_other=0.0)
    grads = np.stack([grads[0], grads[0] * 0.5])  # a global shrink: cosines unchanged
    out = _nulls(grads, trait, other)
    assert not out["beats_random_nulls"] and not out["pass"]
    assert out["worst_percentile"] > 5.0


def test_caps_increase_needs_a_paired_rise() -> None:
    ids = [f"p{i}" for i in range(12)]
    base = np.linspace(0.0, 0.2, 12)
    up = caps_increase(base + 0.6, base, ids, seed=0)
    assert up["pass"] and up["value"] == pytest.approx(0.6)
    flat = caps_increase(base[::-1].copy(), base, ids, seed=0)
    assert not flat["pass"]
    none = caps_increase(np.full(12, np.nan), base, ids, seed=0)
    assert not none["pass"] and none["value"] is None


def test_steering_check_changes_what_the_model_generates(tiny_models) -> None:
    from llmlab.generation import generate
    from llmlab.inoculation.common import conversation

    loaded = tiny_models["llama"]
    convs = [conversation("sys", "Say something."), conversation("sys", "Name a colour.")]
    dc = SimpleNamespace(sanity_max_new_tokens=6, sanity_temperature=0.0, batch_size=4)
    plain = generate(loaded, convs, max_new_tokens=6, temperature=0.0, seed=0, batch_size=4)
    vec = _unit(np.random.default_rng(0).standard_normal(loaded.hidden_size)).astype(np.float32)
    steered = steered_generations(loaded, convs, 1, vec, 50.0, dc, seed=0)
    assert steered != plain
    # Scale ~0 leaves the generations as they were (the hook is removed afterwards too).
    assert steered_generations(loaded, convs, 1, vec, 1e-6, dc, seed=0) == plain
    assert generate(loaded, convs, max_new_tokens=6, temperature=0.0, seed=0, batch_size=4) == plain
