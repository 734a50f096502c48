"""The plan's "what success looks like" list, each item decided from the metrics by a stated rule.

`met` is True, False, or None when the item cannot be assessed (the rule says why). An item
read from a model's free-text or yes/no behaviour (B2, B5, B7) is not assessed when one of its
models leaks the trained yes/no format into open-ended answers above `max_leak_rate`: that
model's numbers then measure the collapsed format, not its self-attribution.
"""

from __future__ import annotations

import math
from typing import Any

LN2 = math.log(2)


def _ci(d: dict[str, Any] | None) -> str:
    if not d:
        return "n/a"
    return f"{d['value']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}]"


def _contains_zero(d: dict[str, Any]) -> bool:
    return d["lo"] <= 0.0 <= d["hi"]


def flipped_learned(t: dict[str, Any]) -> tuple[bool, str]:
    """Return whether the flipped-labels variant learned, and the evidence."""
    acc = t.get("val_accuracy_end")
    loss = t.get("final_train_loss")
    above = bool(acc and acc["lo"] > 0.5)
    low_loss = loss is not None and loss < 0.5 * LN2
    evidence = (
        f"final validation accuracy on its (flipped) labels {_ci(acc)} (n={t.get('n_val')}); "
        f"final train loss {loss if loss is None else round(loss, 3)} (ln 2 = {LN2:.3f})"
    )
    return above or low_loss, evidence


def leak_block(m: dict[str, Any], models: list[str], max_leak_rate: float) -> str | None:
    """Return why the models' leak rates block a verdict (None: every rate is within bounds)."""
    reasons = []
    for model in models:
        only = m["b3_yes_no_intrusion"].get(model, {}).get("only_yes_no")
        if only is None:
            reasons.append(f"{model}: yes/no leak rate not measured (no B3 answers)")
        elif only["value"] > max_leak_rate:
            reasons.append(
                f"{model}: {only['value']:.2f} of B3 answers are only yes/no words "
                f"(> max_leak_rate {max_leak_rate:.2f})"
            )
    return "; ".join(reasons) or None


def success_list(m: dict[str, Any], max_leak_rate: float) -> list[dict[str, Any]]:
    """Return the six success items of the plan with met / rule / evidence.

    Items 1, 2, 5 and 6 are gated on the leak rate of the models they read (see module doc).
    """
    b1, b2, b5, b7 = m["b1_detection"], m["b2_p_yes"], m["b5_calibration"], m["b7_localization"]
    items: list[dict[str, Any]] = []

    food = b2["food_control"]["self_shift_vs_base"]
    orig = b2["original"]["self_shift_vs_base"]
    items.append(
        {
            "criterion": "Run 3 (food-control) shows no self-attribution bias",
            "rule": "95% CI of food-control's self-referential P(yes) shift vs base contains 0",
            "met": _contains_zero(food),
            "evidence": f"food-control shift {_ci(food)}; original shift {_ci(orig)}",
        }
    )

    diff = b2["key_comparisons"]["vague_minus_original_self"]
    vague_item: dict[str, Any] = {
        "criterion": "Run 1 (vague-prompt) shows a bias similar to model 0",
        "rule": "model 0's shift vs base has CI above 0, and the vague - original difference "
        "has a CI containing 0; not assessable when model 0 shows no bias",
        "evidence": f"original shift {_ci(orig)}; vague - original {_ci(diff)}",
    }
    vague_item["met"] = None if orig["lo"] <= 0 else _contains_zero(diff)
    items.append(vague_item)

    r1 = b1.get("r1_minimal", {}).get("in_distribution", {}).get("accuracy")
    o1 = b1.get("original", {}).get("in_distribution", {}).get("accuracy")
    items.append(
        {
            "criterion": "Run 2 (r1-minimal) still detects steering reasonably well",
            "rule": "r1 in-distribution accuracy CI above 0.5 and within 0.10 of the original's",
            "met": None
            if not (r1 and o1)
            else bool(r1["lo"] > 0.5 and r1["value"] >= o1["value"] - 0.1),
            "evidence": f"r1 accuracy {_ci(r1)}; original {_ci(o1)}",
        }
    )

    learned, evidence = flipped_learned(m["training"]["flipped_labels"])
    items.append(
        {
            "criterion": "Run 4 (flipped-labels) does not converge",
            "rule": "not learned: final validation accuracy CI not above 0.5 and final train loss "
            "not below ln(2)/2",
            "met": not learned,
            "evidence": evidence,
        }
    )

    kl = b5["original"].get("kl_minus_base")
    items.append(
        {
            "criterion": "Self-calibration (B5) improves",
            "rule": "model 0's KL minus base KL (paired over prompts, >= 3; unparseable reports "
            "count as failures) has a CI below 0",
            "met": None if kl is None else bool(kl["hi"] < 0),
            "evidence": f"original - base KL {_ci(kl)}; unparseable reports: original "
            f"{b5['original']['n_unparseable']}/{b5['original']['n_prompts']}, base "
            f"{b5['base']['n_unparseable']}/{b5['base']['n_prompts']}",
        }
    )

    loc = b7.get("original")
    items.append(
        {
            "criterion": "Localization (B7) shows any signal",
            "rule": "for model 0, any localization question with accuracy CI above chance",
            "met": None if loc is None else bool(loc["any_signal"]),
            "evidence": "; ".join(
                f"{q}: {loc[q]['accuracy']['value']:.2f} [{loc[q]['accuracy']['lo']:.2f}, "
                f"{loc[q]['accuracy']['hi']:.2f}] vs chance {loc[q]['chance']:.2f}"
                for q in ("layer_third", "strength", "sentence")
                if loc and q in loc
            )
            or "B7 not run for model 0",
        }
    )
    for item, models in zip(
        items,
        (["food_control"], ["original", "vague"], [], [], ["original"], ["original"]),
        strict=True,
    ):
        blocked = leak_block(m, models, max_leak_rate)
        if blocked:
            item["met"] = None
            item["evidence"] += f"; not assessed, yes/no format leak: {blocked}"
    return items
