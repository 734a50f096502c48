"""Stage inoculation_control: choose the loss-matched control prompt and save the table.

The calibration batch (from the alignment stage) is split at random (seeded) into two
disjoint halves. On the selection half every candidate's mean loss is compared with the
inoculation prompt's and the closest is the loss-matched control (ties go to the earlier
candidate); its loss gap and criterion 2 are then measured on the evaluation half only.
Choosing and measuring on the same examples favours the candidate whose noise happens to
match inoculation's (a winner's curse), so the same-batch gap understates the true one.
The table records both gaps, the same-batch choice for comparison, each candidate's loss
on the full batch, its distance to inoculation with a paired CI, |g| and trait-ward alignment.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

import numpy as np

from llmlab.inoculation.alignment import ARRAYS_FILE, SUMMARY_FILE, paired_diff
from llmlab.inoculation.common import ALIGNMENT_DIR, CONTROL_TABLE, section
from llmlab.io import DataError, read_json, write_json
from llmlab.params import load_params
from llmlab.stage import run_stage


def select_loss_matched(table: Sequence[dict[str, Any]], target_loss: float) -> dict[str, Any]:
    """Return the row whose mean_loss is closest to target_loss (first on ties).

    Rows need `name` and `mean_loss`; an empty table is an error naming the control list.
    """
    if not table:
        raise DataError("loss-matched control: empty control list (no candidate to choose from)")
    best = None
    for row in table:
        gap = abs(float(row["mean_loss"]) - target_loss)
        if best is None or gap < best[0]:
            best = (gap, row)
    assert best is not None
    return best[1]


def split_halves(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Return (selection, evaluation) example indices: a seeded random split into halves."""
    if n < 4:
        raise DataError(
            f"loss-matched control: {n} calibration examples; cross-fitted selection needs >= 4 "
            "(two per half)"
        )
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[: n // 2]), np.sort(order[n // 2 :])


def cross_fit(
    control_loss: np.ndarray, inoc_loss: np.ndarray, selection: np.ndarray, evaluation: np.ndarray
) -> dict[str, Any]:
    """Return the control chosen on `selection` and its loss gaps on both halves.

    control_loss: [candidates, examples]; inoc_loss: [examples]. The gaps are
    |mean control loss - mean inoculation loss| over each half's examples.
    """
    target_sel = float(inoc_loss[selection].mean())
    rows = [
        {"name": k, "mean_loss": float(control_loss[k, selection].mean())}
        for k in range(control_loss.shape[0])
    ]
    k = select_loss_matched(rows, target_sel)["name"]
    return {
        "index": k,
        "selection_gap": abs(rows[k]["mean_loss"] - target_sel),
        "held_out_gap": abs(
            float(control_loss[k, evaluation].mean()) - float(inoc_loss[evaluation].mean())
        ),
    }


def build_table(
    info: list[dict[str, Any]], ids: list[str], arrays: dict[str, np.ndarray], seed: int
) -> dict[str, Any]:
    """Return the candidates' losses and distances to inoculation plus the chosen control.

    info: the per-condition entries of alignment.json (name, role, text, estimates), in the
    order of the first axis of arrays["loss"] [conditions, examples].
    """
    names = [c["name"] for c in info]
    if "inoculation" not in names:
        raise DataError(f"{ALIGNMENT_DIR / SUMMARY_FILE}: no inoculation condition")
    ino = names.index("inoculation")
    inoc_loss = float(arrays["loss"][ino].mean())
    rows = []
    for c, cond in enumerate(info):
        if cond["role"] != "control":
            continue
        mean_loss = float(arrays["loss"][c].mean())
        rows.append(
            {
                "name": cond["name"],
                "text": cond["text"],
                "mean_loss": mean_loss,
                "loss_ci": [cond["loss"]["lo"], cond["loss"]["hi"]],
                "loss_minus_inoculation": paired_diff(
                    arrays["loss"][c], arrays["loss"][ino], ids, seed
                ).to_dict(),
                "abs_gap": abs(mean_loss - inoc_loss),
                "grad_norm_layer_mean": cond["grad_norm_layer_mean"]["value"],
                "align_layer_mean": cond["align_layer_mean"]["value"],
            }
        )
    same_batch = select_loss_matched(rows, inoc_loss)
    selection, evaluation = split_halves(len(ids), seed)
    controls = [c for c, cond in enumerate(info) if cond["role"] == "control"]
    fit = cross_fit(arrays["loss"][controls], arrays["loss"][ino], selection, evaluation)
    chosen = rows[fit["index"]]
    evaluation_ids = [ids[i] for i in evaluation]
    reference = {
        cond["name"]: {
            "text": cond["text"],
            "mean_loss": float(arrays["loss"][c].mean()),
            "grad_norm_layer_mean": cond["grad_norm_layer_mean"]["value"],
            "align_layer_mean": cond["align_layer_mean"]["value"],
        }
        for c, cond in enumerate(info)
        if cond["role"] != "control"
    }
    gap_ci = paired_diff(
        arrays["loss"][controls[fit["index"]]][evaluation],
        arrays["loss"][ino][evaluation],
        evaluation_ids,
        seed,
    ).to_dict()
    return {
        "n_examples": len(ids),
        "target": "inoculation",
        "target_loss": inoc_loss,
        "reference": reference,
        "candidates": sorted(rows, key=lambda r: r["abs_gap"]),
        "chosen": chosen["name"],
        "chosen_text": chosen["text"],
        "selection": "cross-fitted: chosen on the selection half, measured on the evaluation half",
        "selection_ids": [ids[i] for i in selection],
        "evaluation_ids": evaluation_ids,
        "selection_gap": fit["selection_gap"],
        "held_out_gap": fit["held_out_gap"],
        # The honest gap is the one measured on examples the choice did not see.
        "chosen_gap": fit["held_out_gap"],
        "held_out_loss_minus_inoculation": gap_ci,
        "same_batch_choice": same_batch["name"],
        "same_batch_gap": same_batch["abs_gap"],
        # Matched in the sense that the held-out paired CI of the loss difference covers zero.
        "chosen_ci_covers_zero": bool(gap_ci["lo"] <= 0 <= gap_ci["hi"]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args()
    params = load_params(args.params, family="inoculation")
    cfg = section(params)
    summary = read_json(ALIGNMENT_DIR / SUMMARY_FILE)
    with np.load(ALIGNMENT_DIR / ARRAYS_FILE) as z:
        arrays = {k: z[k] for k in z.files}
    table = build_table(summary["conditions"], summary["example_ids"], arrays, cfg.seed)
    write_json(CONTROL_TABLE, table)
    print(
        f"control: chose {table['chosen']} on {len(table['selection_ids'])} examples (loss gap "
        f"{table['selection_gap']:.4f} there, {table['held_out_gap']:.4f} on the "
        f"{len(table['evaluation_ids'])} held-out examples)"
    )


if __name__ == "__main__":
    run_stage(main)
