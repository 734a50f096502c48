"""Stage preferences_report: results, the headline numbers and a short report.

Reads the measurement fits, the probe, HOO and OOD results; writes the whole results tree to
data/preferences/results.json, the headline to metrics/preferences.json, the markdown report
and the OOD plot (plots/preferences/ood.json, ood.png: git-tracked files the model-loading OOD
stage leaves to this CPU stage, so that stage restores from a pushed run-cache).
"""

from __future__ import annotations

import argparse
from typing import Any

from llmlab.headline import estimate, get, write_headline, write_results
from llmlab.io import read_json, write_text
from llmlab.params import load_params
from llmlab.plots import scatter_plot, write_series
from llmlab.preferences import common as c
from llmlab.preferences.ood_holdout import HELDOUT, SELECT
from llmlab.stage import run_stage


def _measure(split: str) -> dict[str, Any]:
    f = read_json(c.FIT / split / "fit.json")
    keys = (
        "n_tasks",
        "n_edges",
        "rounds",
        "stopped",
        "sample_agreement",
        "n_random_pairs",
        "random_pair_accuracy",
        "random_pair_log_loss",
        "active_heldout_edge_accuracy",
        "active_heldout_edge_log_loss",
        "baseline_log_loss",
        "split_half_reliability",
        "mean_p_first",
        "mean_choice_mass",
        "n_low_mass",
        "low_mass_share",
        "seconds",
    )
    return {k: f[k] for k in keys}


def _ci(d: dict[str, Any] | None, key: str = "value", lo: str = "lo", hi: str = "hi") -> str:
    if not d or d.get(key) is None:
        return "n/a"
    if d.get(lo) is None:
        return f"{d[key]:.3f}"
    return f"{d[key]:.3f} [{d[lo]:.3f}, {d[hi]:.3f}]"


def _ood_set(o: dict[str, Any]) -> dict[str, Any]:
    """Return the reported numbers of one OOD prompt set (held-out, selection or all)."""
    return {
        "n_groups": o["n_groups"],
        "n_prompts": len(o["prompts"]),
        "pearson": o["targeted"]["pearson"],
        "spearman": o["targeted"]["spearman"],
        "sign_agreement": o["targeted"]["sign_agreement"],
        "overall_pearson": o["overall"]["pearson"],
        "overall_spearman": o["overall"]["spearman"],
        "overall_sign_agreement": o["overall"]["sign_agreement"],
        "n_tasks": o["overall"]["n"],
        "specificity": o["specificity"],
        "competing_flip_pearson": o["competing"].get("pearson"),
        "competing_flip_sign_agreement": o["competing"].get("sign_agreement"),
        "competing_behaviour_flips_positive": o["competing"].get("behaviour_positive"),
        "competing_probe_flips_positive": o["competing"].get("probe_positive"),
        "personas": o["personas"],
        "by_kind_pearson": {k: v["pearson"] for k, v in o["by_kind"].items()},
        "behaviour_matches_intent": o["behaviour_matches_intent"],
        "probe_matches_intent": o["probe_matches_intent"],
    }


def build_metrics() -> dict[str, Any]:
    """Return the metrics tree from the stage results."""
    probes = read_json(c.RESULTS / "probes.json")
    hoo = read_json(c.RESULTS / "hoo.json")
    ood = read_json(c.RESULTS / "ood.json")
    raw, dem = probes["headline"]["raw"], probes["headline"]["topic_demeaned"]
    return c.clean_json(
        {
            "model": probes["model"],
            "measure": {"train": _measure("train"), "eval": _measure("eval")},
            "probes": {
                "layer": probes["best_layer"],
                "heldout_r": {"value": raw["r"], "lo": raw["r_lo"], "hi": raw["r_hi"]},
                "pairwise_acc": raw["pairwise_acc"],
                "edge_acc": probes["headline"]["edge_acc_ci"],
                "n_score_edges": raw.get("n_edges"),
                "ceiling_r": probes["headline"]["ceiling_r"],
                "ceiling_edge_acc": probes["headline"]["ceiling_edge_acc"],
                "demeaned_r": {"value": dem["r"], "lo": dem["r_lo"], "hi": dem["r_hi"]},
                "demeaned_layer": dem["layer"],
                "shuffled_r": raw["shuffled_r"],
                "n_score": probes["n_score"],
            },
            "hoo": {
                key: {
                    "label": s["label"],
                    "layer": s["layer"],
                    "held_r": s["mean_held_r"],
                    "held_acc": s["mean_held_acc"],
                    "in_dist_r": s["mean_in_dist_r"],
                }
                for key, s in hoo["feature_sets"].items()
            },
            "ood": {
                "layer": ood["layer"],
                "layer_choice": ood["layer_choice"]["method"],
                "heldout": _ood_set(ood[HELDOUT]),
                "select": _ood_set(ood[SELECT]),
                "all_prompts": _ood_set(ood["all_prompts"]),
            },
        }
    )


def headline(m: dict[str, Any]) -> dict[str, Any]:
    """Return the numbers compared across runs (the rest stays in the results file).

    Intervals go with the numbers the family is judged on (held-out r, HOO r, targeted OOD r);
    the secondary ones carry their value only, so the headline stays within MAX_LEAVES. The
    OOD numbers are those of the held-out system prompts (the selection prompts chose the layer).
    """
    p, o = m["probes"], m["ood"]["heldout"]
    return {
        "probe_layer": p["layer"],
        "heldout_r": estimate(p["heldout_r"]),
        "demeaned_r": get(p, "demeaned_r.value"),
        "shuffled_r": p["shuffled_r"],
        "ceiling_r": p["ceiling_r"],
        "edge_acc": get(p, "edge_acc.value"),
        "pairwise_acc": p["pairwise_acc"],
        "hoo_held_r": {key: estimate(h["held_r"]) for key, h in m["hoo"].items()},
        "hoo_held_acc": {key: get(h, "held_acc.value") for key, h in m["hoo"].items()},
        "ood_pearson": estimate(o["pearson"], "r"),
        "ood_sign_agreement": o["sign_agreement"],
        "ood_overall_pearson": get(o, "overall_pearson.r"),
        "ood_overall_sign_agreement": o["overall_sign_agreement"],
        "eval_random_pair_acc": m["measure"]["eval"]["random_pair_accuracy"],
        "eval_sample_agreement": m["measure"]["eval"]["sample_agreement"],
        "eval_split_half_reliability": m["measure"]["eval"]["split_half_reliability"],
    }


def render(m: dict[str, Any]) -> str:
    """Return the markdown report."""
    p, tr, ev = m["probes"], m["measure"]["train"], m["measure"]["eval"]
    lines = [
        f"# Preferences: utilities and probes ({m['model']})",
        "",
        "| measure | train | eval |",
        "| --- | --- | --- |",
        f"| tasks / edges | {tr['n_tasks']} / {tr['n_edges']} | {ev['n_tasks']} / {ev['n_edges']} |",
        f"| random hold-out pairs | {tr['n_random_pairs']} | {ev['n_random_pairs']} |",
        f"| random-pair accuracy | {_f(tr['random_pair_accuracy'])} | {_f(ev['random_pair_accuracy'])} |",
        f"| random-pair log-loss (chance 0.693) | {_f(tr['random_pair_log_loss'])} | {_f(ev['random_pair_log_loss'])} |",
        f"| sample agreement (paper's accuracy) | {_f(tr['sample_agreement'])} | {_f(ev['sample_agreement'])} |",
        f"| held-out active-edge accuracy (near-ties) | {_f(tr['active_heldout_edge_accuracy'])} | {_f(ev['active_heldout_edge_accuracy'])} |",
        f"| low-mass pair-orders (counted 0.5) | {tr['n_low_mass']} | {ev['n_low_mass']} |",
        f"| split-half reliability | {_f(tr['split_half_reliability'])} | {_f(ev['split_half_reliability'])} |",
        f"| mean P(first shown) / A-B mass | {_f(tr['mean_p_first'])} / {_f(tr['mean_choice_mass'])} | {_f(ev['mean_p_first'])} / {_f(ev['mean_choice_mass'])} |",
        "",
        f"**Probe (layer {p['layer']}, {p['n_score']} score-half eval tasks):** held-out r "
        f"{_ci(p['heldout_r'])} (noise ceiling {_f(p['ceiling_r'])}); pairwise accuracy "
        f"{_f(p['pairwise_acc'])}; accuracy on measured edges {_ci(p['edge_acc'])} "
        f"(Thurstonian ceiling {_f(p['ceiling_edge_acc'])}); topic-demeaned r "
        f"{_ci(p['demeaned_r'])}; shuffled-target control r {_f(p['shuffled_r'])}.",
        "",
        "HOO means are over topic folds weighted by fold size.",
        "",
        "| HOO features | layer | mean held-out r [95% CI] | mean held-out pairwise accuracy | mean in-dist r |",
        "| --- | --- | --- | --- | --- |",
    ]
    for key, h in m["hoo"].items():
        lines.append(
            f"| {key} ({h['label']}) | {h['layer']} | {_ci(h['held_r'])} | {_ci(h['held_acc'])} | {_ci(h['in_dist_r'])} |"
        )
    o = m["ood"]
    lines += [
        "",
        f"**OOD system prompts:** probe layer {o['layer']} ("
        + (
            "chosen on the selection prompts"
            if o["layer_choice"] == "select"
            else "the probes stage's, chosen on preference data"
        )
        + "); the held-out prompts chose nothing and give the reported numbers.",
        "",
        "| prompts | groups | targeted Pearson r [95% CI] | Spearman | sign agreement | overall r (target and off-target tasks) | overall sign agreement | behaviour / probe as intended | specificity behaviour / probe |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, label in (("heldout", "held-out"), ("select", "selection"), ("all_prompts", "all")):
        s = o[name]
        lines.append(
            f"| {label} ({s['n_prompts']}) | {s['n_groups']} | {_ci(s['pearson'], 'r')} | "
            f"{_ci(s['spearman'], 'r')} | {_f(s['sign_agreement'])} | "
            f"{_ci(s['overall_pearson'], 'r')} | {_f(s['overall_sign_agreement'])} | "
            f"{_f(s['behaviour_matches_intent'])} / {_f(s['probe_matches_intent'])} | "
            f"{_f(s['specificity']['behaviour'])} / {_f(s['specificity']['probe'])} |"
        )
    lines += [
        "",
        "Plots: plots/preferences/probes_layers.png, hoo.png, ood.png.",
        "",
    ]
    return "\n".join(lines)


def _f(v: Any) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args()
    load_params(args.params, family="preferences")
    m = build_metrics()
    write_results("preferences", m)
    write_headline("metrics/preferences.json", headline(m))
    write_text("metrics/preferences_report.md", render(m))
    write_ood_plot(read_json(c.RESULTS / "ood.json"), m["model"])


def write_ood_plot(ood: dict[str, Any], model: str) -> None:
    """Write the OOD plot series and scatter (git-tracked) from the cached OOD result.

    Drawn here, not in preferences_ood, so the model-loading stage has only cached outputs and
    restores from a pushed run-cache on another machine.
    """
    rows = ood["groups"]
    write_series(c.PLOTS / "ood.json", rows)
    held = [r for r in rows if r["prompt_set"] == HELDOUT]
    scatter_plot(
        c.PLOTS / "ood.png",
        [r["behaviour_delta"] for r in held],
        [r["probe_delta"] for r in held],
        labels=[r["label"][:10] + ("+" if r["direction"] > 0 else "-") for r in held],
        title=f"OOD held-out system prompts: probe vs behaviour ({model}, L{ood['layer']})",
        xlabel="behavioural delta P(choose target)",
        ylabel="probe delta (utility units)",
    )


if __name__ == "__main__":
    run_stage(main)
