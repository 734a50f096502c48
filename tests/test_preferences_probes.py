"""Probes, HOO and their bad-input errors, on synthetic utilities and activations (no model)."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.linear_model import Ridge

from llmlab.activations import layer_file
from llmlab.io import DataError
from llmlab.preferences import common as c
from llmlab.preferences.hoo import make_folds
from llmlab.preferences.probe import Probe, RidgePath, load_probe, save_probe

TOPICS = ["math", "coding", "fiction", "advice", "trivia"]
HIDDEN = 24


def _params(tmp: Path) -> None:
    (tmp / "params.yaml").write_text(
        "model: fake\nmodels:\n  fake: {source: local, path: /nonexistent, chat: true}\n"
        "preferences:\n  probes: {alpha_sweep_size: 6, n_boot: 100}\n  hoo: {min_fold_size: 4}\n"
    )


def build_workspace(tmp: Path, n_train: int = 100, n_eval: int = 60, seed: int = 0) -> dict:
    """Write split, utilities, outcomes and activations where utility is linear in activations."""
    rng = np.random.default_rng(seed)
    ids = [f"t{k:05d}" for k in range(n_train + n_eval)]
    topics = {t: TOPICS[k % len(TOPICS)] for k, t in enumerate(ids)}
    x = rng.normal(size=(len(ids), HIDDEN))
    w = rng.normal(size=HIDDEN)
    mu = x @ w + 0.5 * rng.normal(size=len(ids))
    mu = (mu - mu.mean()) / mu.std()
    split = tmp / c.SPLIT
    split.mkdir(parents=True)
    with open(split / "pool.jsonl", "w") as fh:
        for t in ids:
            fh.write(
                json.dumps(
                    {
                        "id": t,
                        "topic": topics[t],
                        "origin": "templated",
                        "prompt": f"Do task {t} now please.",
                    }
                )
                + "\n"
            )
    (split / "topics.json").write_text(json.dumps({"topics": TOPICS, "task_topics": topics}))
    tr, ev = ids[:n_train], ids[n_train:]
    (split / "train_ids.txt").write_text("\n".join(tr) + "\n")
    (split / "eval_ids.txt").write_text("\n".join(ev) + "\n")
    pos = {t: k for k, t in enumerate(ids)}
    for name, part in (("train", tr), ("eval", ev)):
        d = tmp / c.MEASURE / name
        d.mkdir(parents=True)
        (tmp / c.FIT / name).mkdir(parents=True)
        with open(tmp / c.FIT / name / "utilities.csv", "w", newline="") as fh:
            wr = csv.writer(fh)
            wr.writerow(c.UTILITY_FIELDS)
            for t in part:
                wr.writerow([t, topics[t], mu[pos[t]], 1.0, 5])
        with open(d / "outcomes.jsonl", "w") as fh:
            for k in range(len(part)):
                a, b = part[k], part[(k + 1) % len(part)]
                p = float(mu[pos[a]] > mu[pos[b]])
                fh.write(
                    json.dumps({"round": 0, "task_a": a, "task_b": b, "p_a": p, "mass": 1.0}) + "\n"
                )
        (tmp / c.FIT / name / "fit.json").write_text(json.dumps({"split_half_reliability": 0.9}))
    write_acts(tmp / c.ACTS / "instruct", ids, x)
    _params(tmp)
    return {"ids": ids, "x": x, "mu": mu, "topics": topics}


def write_acts(
    d: Path, ids: list[str], x: np.ndarray, layer: int = 1, dtype: str = "float32"
) -> None:
    d.mkdir(parents=True, exist_ok=True)
    np.save(d / layer_file(layer), x.astype(dtype))
    (d / "index.json").write_text(
        json.dumps(
            {
                "model": "fake",
                "layers": [layer],
                "position": "prompt_last",
                "hidden_size": x.shape[1],
                "dtype": dtype,
                "n_items": len(ids),
                "ids": ids,
            }
        )
    )


def run_main(module: str, tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    monkeypatch.chdir(tmp)
    monkeypatch.setattr(sys, "argv", [module])
    from llmlab.stage import run_stage

    run_stage(importlib.import_module(module).main)


def test_ridge_path_matches_sklearn() -> None:
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(50, 8)) * rng.uniform(0.5, 3, 8), rng.normal(size=50)
    path = RidgePath(x, y)
    xs = (x - x.mean(0)) / x.std(0)
    ref = Ridge(alpha=3.0).fit(xs, y)
    assert np.allclose(path.coef(3.0), ref.coef_, atol=1e-8)
    assert np.allclose(path.predict(x, 3.0), ref.predict(xs), atol=1e-8)
    assert path.gcv_alpha([1e-3, 1.0, 1e6]) in (1e-3, 1.0, 1e6)


def test_probe_roundtrip_without_pickle(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(30, 6)), rng.normal(size=30)
    probe = RidgePath(x, y).probe(2.0, layer=3, target="raw", model="m", note="x")
    save_probe(tmp_path / "p.safetensors", probe)
    assert sorted(f.name for f in tmp_path.iterdir()) == ["p.json", "p.safetensors"]
    back = load_probe(tmp_path / "p.safetensors")
    assert isinstance(back, Probe) and back.layer == 3 and back.meta == {"note": "x"}
    # float64 on disk: the saved probe scores exactly as the fitted one
    assert np.array_equal(back.score(x), probe.score(x))
    # readable without llmlab: the weights in raw activation space from safetensors alone
    from safetensors.numpy import load_file

    raw = load_file(str(tmp_path / "p.safetensors"))
    assert np.array_equal(raw["coef"] / raw["scale"], probe.direction())
    with pytest.raises(DataError, match=r"\[n, 6\]"):
        back.score(x[:, :5])
    (tmp_path / "p.json").write_text('{"kind": "other"}')
    with pytest.raises(DataError, match=r"p\.json: kind 'other', expected"):
        load_probe(tmp_path / "p.safetensors")


def test_probes_stage_recovers_signal_and_shuffled_is_null(tmp_path, monkeypatch) -> None:
    ws = build_workspace(tmp_path)
    run_main("llmlab.preferences.probes", tmp_path, monkeypatch)
    res = json.loads((tmp_path / c.RESULTS / "probes.json").read_text())
    head = res["headline"]["raw"]
    assert head["r"] > 0.8 and head["pairwise_acc"] > 0.75
    assert abs(head["shuffled_r"]) < 0.35
    assert res["headline"]["ceiling_r"] == pytest.approx(0.9**0.5)
    probe = load_probe(tmp_path / res["best_probe"])
    ev = ws["ids"][100:]
    pred = probe.score(ws["x"][100:])
    assert np.corrcoef(pred, ws["mu"][100:])[0, 1] > 0.8
    assert len(ev) == res["n_eval"]
    assert (tmp_path / "plots/preferences/probes_layers.png").is_file()


def test_hoo_stage_folds_every_topic(tmp_path, monkeypatch) -> None:
    ws = build_workspace(tmp_path)
    write_acts(
        tmp_path / c.ACTS / "minilm", ws["ids"], np.random.default_rng(3).normal(size=(160, 8)), 0
    )
    run_main("llmlab.preferences.hoo", tmp_path, monkeypatch)
    res = json.loads((tmp_path / c.RESULTS / "hoo.json").read_text())
    inst, content = res["feature_sets"]["instruct"], res["feature_sets"]["content"]
    assert [f["topic"] for f in inst["folds"]] == TOPICS
    assert inst["mean_held_r"]["value"] > 0.7
    assert abs(content["mean_held_r"]["value"]) < 0.4
    assert (tmp_path / "plots/preferences/hoo.png").is_file()


def _expect_error(module, tmp_path, monkeypatch, capsys, pattern: str) -> None:
    with pytest.raises(SystemExit) as exc:
        run_main(module, tmp_path, monkeypatch)
    assert exc.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert pytest.importorskip("re").search(pattern, err[0]), err[0]
    assert not (tmp_path / c.RESULTS).exists(), "nothing may be written on bad input"
    assert not (tmp_path / c.PROBES).exists()


def test_error_task_in_both_splits(tmp_path, monkeypatch, capsys) -> None:
    ws = build_workspace(tmp_path)
    f = tmp_path / c.FIT / "eval" / "utilities.csv"
    t0 = ws["ids"][0]
    f.write_text(f.read_text() + f"{t0},{ws['topics'][t0]},0.1,1.0,3\n")
    _expect_error(
        "llmlab.preferences.probes", tmp_path, monkeypatch, capsys, rf"task {t0} is in both"
    )


def test_error_topic_missing(tmp_path, monkeypatch, capsys) -> None:
    ws = build_workspace(tmp_path)
    f = tmp_path / c.POOL_TOPICS
    doc = json.loads(f.read_text())
    del doc["task_topics"][ws["ids"][5]]
    f.write_text(json.dumps(doc))
    pat = rf"task {ws['ids'][5]} is missing from the topic file"
    _expect_error("llmlab.preferences.probes", tmp_path, monkeypatch, capsys, pat)
    _expect_error("llmlab.preferences.hoo", tmp_path, monkeypatch, capsys, pat)


def test_error_activation_index_mismatch(tmp_path, monkeypatch, capsys) -> None:
    ws = build_workspace(tmp_path)
    write_acts(tmp_path / c.ACTS / "instruct", ws["ids"][:-1], ws["x"][:-1])
    pat = rf"activation index does not match eval utilities.*{ws['ids'][-1]}"
    _expect_error("llmlab.preferences.probes", tmp_path, monkeypatch, capsys, pat)


def test_error_empty_fold(tmp_path, monkeypatch, capsys) -> None:
    build_workspace(tmp_path)
    f = tmp_path / c.POOL_TOPICS
    doc = json.loads(f.read_text())
    doc["topics"].append("translation")
    f.write_text(json.dumps(doc))
    pat = r"HOO fold 'translation' has 0 task\(s\)"
    _expect_error("llmlab.preferences.hoo", tmp_path, monkeypatch, capsys, pat)


def test_make_folds_small_fold_message() -> None:
    topics = ["a"] * 10 + ["c"] * 10 + ["b"] * 2
    with pytest.raises(DataError, match=r"fold 'b' has 2 task\(s\), needs at least 4"):
        make_folds(topics, ["a", "c", "b"], 4, "u.csv")


def test_read_ids_and_disjoint(tmp_path: Path) -> None:
    (tmp_path / "ids.txt").write_text("t1\n\nt2\nt1\n")
    with pytest.raises(DataError, match=r"ids\.txt:4: duplicate task id 't1'"):
        c.read_ids(tmp_path / "ids.txt")
    with pytest.raises(DataError, match="task t2 is in both a and b"):
        c.check_disjoint(["t1", "t2"], ["t2", "t3"], "a", "b")


def test_hoo_trains_on_every_other_topic_and_weights_folds_by_size() -> None:
    from llmlab.preferences.hoo import run_features, summarise

    topics = ["a"] * 30 + ["b"] * 10 + ["c"] * 20
    folds = make_folds(topics, ["a", "b", "c"], 4, "u.csv")
    for f in folds:
        assert sorted([*f.held, *f.fit]) == list(range(60))  # nothing held back
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 5))
    y = x @ np.array([1.0, -0.5, 0.2, 0.0, 0.0]) + rng.normal(scale=0.1, size=60)
    rows = run_features(x, y, folds, [0.1, 1.0, 10.0])
    assert all(r["held_acc"] > 0.8 and r["in_dist_r"] > 0.9 for r in rows)
    assert [r["n_fit"] for r in rows] == [30, 50, 40]
    rows[1]["held_r"] = -1.0  # the small fold weighs 10 of 60
    s = summarise(rows, y, folds, n_boot=200, seed=0)
    want = (30 * rows[0]["held_r"] + 10 * -1.0 + 20 * rows[2]["held_r"]) / 60
    assert s["mean_held_r"]["value"] == pytest.approx(want)
    assert s["mean_held_r"]["unweighted"] == pytest.approx(
        (rows[0]["held_r"] - 1.0 + rows[2]["held_r"]) / 3
    )
    assert s["mean_held_acc"]["lo"] <= s["mean_held_acc"]["value"] <= s["mean_held_acc"]["hi"]


def test_loo_predictions_match_refits() -> None:
    from llmlab.preferences.probe import RidgePath

    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(12, 3)), rng.normal(size=12)
    loo = RidgePath(x, y).loo_predictions(1.0)
    # the closed form keeps the scaler of all rows; a refit with that scaler is exact
    path = RidgePath(x, y)
    xs = path.scaler(x)
    for k in range(12):
        keep = np.arange(12) != k
        xm = xs[keep] - xs[keep].mean(0)
        ym = y[keep] - y[keep].mean()
        beta = np.linalg.solve(xm.T @ xm + np.eye(3), xm.T @ ym)
        pred = (xs[k] - xs[keep].mean(0)) @ beta + y[keep].mean()
        assert loo[k] == pytest.approx(pred, abs=1e-8)


def test_float16_activations_are_read_as_float32_and_overflow_is_refused(tmp_path) -> None:
    ids = ["t0", "t1", "t2"]
    x = np.array([[1.5, -2.0], [0.25, 3.0], [7.0, 1e-3]])
    write_acts(tmp_path / "acts", ids, x, dtype="float16")
    got = c.features(tmp_path / "acts", 1, ["t2", "t0"], "u")
    assert got.dtype == np.float32
    assert np.allclose(got, x[[2, 0]], rtol=1e-3)
    big = np.array([[1.0, 2.0], [7e4, 0.0], [0.0, 0.0]])
    with np.errstate(over="ignore"):  # the overflow a float16 capture can meet
        write_acts(tmp_path / "big", ids, big, dtype="float16")
    with pytest.raises(DataError, match=r"layer 1, task t1, dimension 0 is inf .*store_dtype"):
        c.features(tmp_path / "big", 1, ids, "u")


def test_one_decomposition_serves_every_target() -> None:
    from llmlab.preferences.probe import RidgePath

    rng = np.random.default_rng(2)
    x, y, z = rng.normal(size=(20, 6)), rng.normal(size=20), rng.normal(size=20)
    shared = RidgePath(x, y).with_target(z)
    fresh = RidgePath(x, z)
    assert np.allclose(shared.coef(3.0), fresh.coef(3.0))
    assert np.allclose(shared.loo_predictions(3.0), fresh.loo_predictions(3.0))
    assert shared.gcv_alpha([0.1, 1, 10]) == fresh.gcv_alpha([0.1, 1, 10])
