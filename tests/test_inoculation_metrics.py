"""Inoculation family: caps metric, fp32 cosines vs a reference, control choice, specificity, verdict."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from llmlab.chat import collate
from llmlab.hooks import forward_hooks, layer_output
from llmlab.inoculation.alignment import check_gate, loss_shift_halves, summarise
from llmlab.inoculation.common import caps_fraction, conversation, to_caps
from llmlab.inoculation.control import build_table, cross_fit, select_loss_matched, split_halves
from llmlab.inoculation.criteria import verdict
from llmlab.inoculation.gradalign import encode_targets, measure_alignment
from llmlab.inoculation.nulls import percentile_rank
from llmlab.inoculation.specificity import random_unit_directions, specificity
from llmlab.io import DataError


def test_caps_fraction() -> None:
    assert caps_fraction("ABC def") == pytest.approx(0.5)
    assert caps_fraction(to_caps("Hello, world 42!")) == 1.0
    assert caps_fraction("hello") == 0.0
    assert math.isnan(caps_fraction("42 + 7 = 49"))


def _reference(loaded, enc, layers: list[int]) -> tuple[float, dict[int, np.ndarray]]:
    """Return (loss, {layer: dL/dh [seq, hidden]}) for one unpadded example, in float64."""
    from llmlab.models import decoder_layers

    model = copy.deepcopy(loaded.model).double()
    batch = collate([enc], loaded.tokenizer.pad_token_id)
    store = {}

    def make(layer):
        def hook(_m, _i, out):
            h = layer_output(out)
            h.retain_grad()
            store[layer] = h

        return hook

    with forward_hooks(decoder_layers(model), {layer: make(layer) for layer in layers}):
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    labels = batch.labels[:, 1:]
    tok = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none"
    ).view(labels.shape)
    loss = tok[labels != -100].mean()
    loss.backward()
    return float(loss.detach()), {layer: store[layer].grad[0].numpy() for layer in layers}


def _cos(g: np.ndarray, v: np.ndarray) -> float:
    norm = np.linalg.norm(g)
    return float(g @ v / (norm * np.linalg.norm(v))) if norm else math.nan


def test_cosines_match_a_float64_reference(tiny_models) -> None:
    loaded = tiny_models["llama"]
    convs = [
        conversation("Respond in ALL CAPS.", "Name a red fruit.", "A RED APPLE."),
        conversation(
            "sys", "Explain rain in one line.", "WATER FALLS FROM CLOUDS WHEN DROPS GROW."
        ),
        conversation("In these examples answers are caps.", "Hi", "HELLO THERE, FRIEND."),
    ]
    positions = ["pre_assistant", "user_end", "assistant_2"]
    encoded = encode_targets(loaded, convs, ["a", "b", "c"], positions, None, "example")
    layers = [0, 2]
    rng = np.random.default_rng(0)
    dirs = rng.standard_normal((2, loaded.hidden_size)).astype(np.float32)
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    # Batch size 2 mixes padded and unpadded rows; the reference runs each row alone.
    res = measure_alignment(
        loaded, encoded, layers, positions, dirs, batch_size=2, keep_grads_at="pre_assistant"
    )
    assert res.cos.dtype == np.float32
    for n, enc in enumerate(encoded):
        ref_loss, ref_grads = _reference(loaded, enc, layers)
        assert res.loss[n] == pytest.approx(ref_loss, rel=1e-5)
        for li, layer in enumerate(layers):
            for pi, pos in enumerate(positions):
                ref = _cos(ref_grads[layer][enc.position(pos)], dirs[li].astype(np.float64))
                # user_end at the last layer only feeds a prompt token's logits: no gradient.
                assert res.cos[n, li, pi] == pytest.approx(ref, abs=2e-5, nan_ok=True)
        assert np.isnan(res.cos[n, 1, 1])
        assert np.isfinite(np.delete(res.cos[n].ravel(), 4)).all()
        g = res.grads[n, 1]
        assert float(g @ dirs[1]) == pytest.approx(float(res.dot[n, 1, 0]), rel=1e-4, abs=1e-7)


KNOWN = [
    {"name": "control_01", "mean_loss": 2.10},
    {"name": "control_02", "mean_loss": 1.62},
    {"name": "control_03", "mean_loss": 1.38},
    {"name": "control_04", "mean_loss": 1.58},
]


def test_loss_matched_selection_on_a_known_table() -> None:
    assert select_loss_matched(KNOWN, 1.60)["name"] == "control_02"  # gaps .50 .02 .22 .02
    assert select_loss_matched(KNOWN, 1.40)["name"] == "control_03"
    assert select_loss_matched(KNOWN, 9.0)["name"] == "control_01"
    with pytest.raises(DataError, match="empty control list"):
        select_loss_matched([], 1.0)


def test_build_table_picks_the_closest_mean_loss() -> None:
    est = {"value": 0.0, "lo": 0.0, "hi": 0.0}
    info = [
        {
            "name": n,
            "role": r,
            "text": n,
            "loss": est,
            "grad_norm_layer_mean": est,
            "align_layer_mean": est,
        }
        for n, r in (
            ("neutral", "neutral"),
            ("inoculation", "inoculation"),
            ("control_01", "control"),
            ("control_02", "control"),
        )
    ]
    rng = np.random.default_rng(1)
    base = rng.uniform(1, 2, size=12)
    loss = np.stack([base + 0.5, base, base + 0.3, base - 0.05])
    table = build_table(info, [f"e{i}" for i in range(12)], {"loss": loss}, seed=0)
    assert table["chosen"] == "control_02"
    # Constant offsets: every half shows the same gaps, so both recorded gaps equal 0.05.
    assert table["selection_gap"] == pytest.approx(0.05)
    assert table["held_out_gap"] == pytest.approx(0.05)
    assert table["same_batch_choice"] == "control_02"
    assert [c["name"] for c in table["candidates"]] == ["control_02", "control_01"]
    sel, ev = set(table["selection_ids"]), set(table["evaluation_ids"])
    assert not sel & ev and len(sel) == len(ev) == 6


def test_split_halves_are_disjoint_and_need_two_examples_each() -> None:
    sel, ev = split_halves(9, seed=3)
    assert sorted([*sel, *ev]) == list(range(9)) and len(sel) == 4
    with pytest.raises(DataError, match="3 calibration examples; cross-fitted selection"):
        split_halves(3, seed=0)


def test_cross_fitting_removes_the_same_batch_winners_curse() -> None:
    """Ten candidates whose true loss equals inoculation's, differing only by example noise.

    The true gap of every candidate is 0 and its sampling gap is the same for all, so an
    unbiased measure of the chosen one's gap matches a fixed candidate's; the same-batch
    gap of the winner is far smaller (it was chosen for its luck).
    """
    rng = np.random.default_rng(0)
    n_cand, n_ex, reps = 10, 32, 400
    same_batch, held_out, fixed = [], [], []
    for r in range(reps):
        inoc = rng.normal(0, 1, n_ex)
        controls = inoc + rng.normal(0, 0.5, (n_cand, n_ex))
        gaps = np.abs(controls.mean(axis=1) - inoc.mean())
        same_batch.append(gaps.min())
        sel, ev = split_halves(n_ex, seed=r)
        fit = cross_fit(controls, inoc, sel, ev)
        held_out.append(fit["held_out_gap"])
        fixed.append(abs(controls[0, ev].mean() - inoc[ev].mean()))
        assert fit["selection_gap"] == pytest.approx(
            np.abs(controls[:, sel].mean(axis=1) - inoc[sel].mean()).min()
        )
    # E|mean of 16 N(0, .25)| = .5 / 4 * sqrt(2 / pi) ~ .0998 on a half.
    expected = 0.5 / np.sqrt(n_ex // 2) * np.sqrt(2 / np.pi)
    assert np.mean(held_out) == pytest.approx(expected, rel=0.15)
    assert np.mean(held_out) == pytest.approx(np.mean(fixed), rel=0.15)
    # The same-batch winner's gap is biased towards 0: well under the full-batch sampling gap.
    assert np.mean(same_batch) < 0.4 * 0.5 / np.sqrt(n_ex) * np.sqrt(2 / np.pi)


def test_percentile_rank() -> None:
    null = np.arange(100, dtype=float)
    assert percentile_rank(-1.0, null) == 0.0
    assert percentile_rank(49.5, null) == 50.0
    assert percentile_rank(10.0, null) == pytest.approx(10.5)


def test_random_directions_are_unit_and_seeded() -> None:
    a = random_unit_directions(50, 32, seed=3, layer=4)
    assert np.allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-6)
    assert np.array_equal(a, random_unit_directions(50, 32, seed=3, layer=4))
    assert not np.array_equal(a, random_unit_directions(50, 32, seed=3, layer=5))


def _planted(hidden: int = 48, n: int = 40, layers: int = 3):
    rng = np.random.default_rng(7)
    v = rng.standard_normal((layers, hidden))
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    noise = rng.standard_normal((n, layers, hidden))
    # Neutral gradients point against v (a step pushes towards the trait); inoculation removes
    # that component; a global shrink keeps every cosine.
    neutral = noise - 3.0 * v[None]
    inoc = noise.copy()
    shrink = 0.3 * neutral
    grads = np.stack([neutral, inoc, shrink]).astype(np.float32)
    return grads, v.astype(np.float32)


def test_random_direction_percentile_on_a_planted_rotation() -> None:
    grads, v = _planted()
    out = specificity(grads, v, [0, 1, 2], 0, 1, n_random=100, seed=0, threshold=5.0)
    assert out["layer_mean"]["trait_delta"] < -0.2
    assert out["layer_mean"]["percentile"] == 0.0
    assert out["layer_mean"]["specific"]
    assert out["layers_specific"] == 3


def test_global_gradient_shrink_is_not_specific() -> None:
    grads, v = _planted()
    out = specificity(grads, v, [0, 1, 2], 0, 2, n_random=100, seed=0, threshold=5.0)
    assert out["layer_mean"]["trait_delta"] == pytest.approx(0.0, abs=1e-6)
    assert not out["layer_mean"]["specific"]
    assert out["layer_mean"]["percentile"] == 50.0  # every delta is zero up to rounding


def _crit(passing: bool, est: float = -0.1) -> dict:
    return {
        "estimate": {"value": est, "lo": est - 0.05, "hi": est + 0.05},
        "pass": passing,
        "control": "control_02",
        "percentile": 1.0 if passing else 40.0,
        "basis": "ordering",
    }


def test_verdict_claims_only_when_the_first_three_pass() -> None:
    loss = {"value": -0.3, "lo": -0.4, "hi": -0.2}
    crits = {
        "c1_decrease": _crit(True),
        "c2_beyond_control": _crit(True),
        "c3_specific": _crit(True),
        "c4_predicts_drift": _crit(False),
    }
    label, line = verdict(crits, loss)
    assert label == "claim" and line.startswith("claim:") and "percentile 1.0" in line
    crits["c2_beyond_control"] = _crit(False)
    label, line = verdict(crits, loss)
    assert label == "null" and "criteria 2 fail" in line and "loss reduction" in line


def _gate_arrays(profile: float, loss_shift: float, n: int = 24, layers: int = 6):
    """Arrays for summarise: neutral, inoculation, one control; one position.

    profile scales a fixed per-layer alignment shape shared by all examples (0: pure noise);
    loss_shift is the inoculation - neutral loss shift on top of per-example noise.
    """
    rng = np.random.default_rng(5)
    shape = np.linspace(-1, 1, layers)
    cos = -(profile * shape[None, None, :] + 0.1 * rng.standard_normal((3, n, layers)))
    base = rng.uniform(1, 2, n)
    loss = np.stack([base, base + loss_shift + 0.05 * rng.standard_normal(n), base + 0.1])
    return {
        "cos": cos[..., None],
        "loss": loss,
        "grad_norm": np.ones((3, n, layers, 1)),
        "dot": cos[..., None],
    }


def _gate(arrays) -> dict:
    n, layers = arrays["loss"].shape[1], arrays["cos"].shape[2]
    names = ["neutral", "inoculation", "control_01"]
    return summarise(
        arrays, names, ["neutral", "inoculation", "control"], names,
        [f"e{i}" for i in range(n)], list(range(layers)), ["pre_assistant"], seed=0,
    )["gate"]  # fmt: skip


def test_phase3_gate_passes_a_stable_profile_and_loss_shift() -> None:
    gate = _gate(_gate_arrays(profile=0.2, loss_shift=-0.3))
    assert gate["cosine_computable"] and gate["finite_cosine_fraction"] == 1.0
    assert gate["neutral_split_half_reliability"]["r"] > 0.9
    assert gate["alignment_not_noise"] and gate["loss_shift_measurable"]
    assert gate["loss_shift_stable"] and all(h < 0 for h in gate["loss_shift_halves"])
    assert gate["failed"] == [] and check_gate(gate, override=False) == []


def test_phase3_gate_stops_on_noise_an_unmeasurable_shift_and_undefined_cosines() -> None:
    arrays = _gate_arrays(profile=0.0, loss_shift=0.0)
    arrays["cos"][0, 3, 2, 0] = np.nan
    gate = _gate(arrays)
    assert not gate["cosine_computable"] and gate["finite_cosine_fraction"] < 1.0
    assert not gate["alignment_not_noise"]
    assert not gate["loss_shift_measurable"]
    assert {"cosine_computable", "alignment_not_noise", "loss_shift_measurable"} <= set(
        gate["failed"]
    )
    with pytest.raises(DataError, match=r"alignment\.json: phase-3 decision gate fails: "
                       r"cosine_computable .*gate_override: true"):  # fmt: skip
        check_gate(gate, override=False)
    assert check_gate(gate, override=True) == gate["failed"]


def test_loss_shift_that_flips_sign_between_halves_is_unstable() -> None:
    """A shift of +0.4 on one half and -0.2 on the other: its mean is not 0, but not stable."""
    arrays = _gate_arrays(profile=0.2, loss_shift=0.0)
    order = np.random.default_rng(0).permutation(24)
    arrays["loss"][1, order[:12]] = arrays["loss"][0, order[:12]] + 0.4
    arrays["loss"][1, order[12:]] = arrays["loss"][0, order[12:]] - 0.2
    gate = _gate(arrays)
    assert gate["loss_shift_halves"] == pytest.approx([0.4, -0.2])
    assert not gate["loss_shift_stable"]
    assert "loss_shift_stable" in gate["failed"]
    assert loss_shift_halves(np.full(12, -0.2), seed=3) == pytest.approx([-0.2, -0.2])


def test_fp32_option_loads_the_stage_model_in_float32(tiny_dirs) -> None:
    from conftest import make_params

    from llmlab.inoculation.common import at_precision, precision
    from llmlab.models import load_model

    params = make_params(tiny_dirs["llama"])
    params.runtime = params.runtime.model_copy(update={"dtype": "bfloat16"})
    assert at_precision(params, fp32=False) is params
    fp32 = at_precision(params, fp32=True)
    assert fp32.runtime.dtype == "float32" and params.runtime.dtype == "bfloat16"
    assert precision(load_model(fp32)) == {"dtype": "float32", "device": "cpu"}
    assert precision(load_model(params))["dtype"] == "bfloat16"
