"""Stage inoculation_control: choose the loss-matched control prompt and save the table.

Every candidate's mean loss on the fixed calibration batch (from the alignment stage) is
compared with the inoculation prompt's; the candidate whose mean loss is closest is the
loss-matched control (ties go to the earlier candidate). The table keeps each candidate's
loss, its distance to inoculation with a paired CI, |g| and trait-ward alignment.
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
    chosen = select_loss_matched(rows, inoc_loss)
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
    gap_ci = chosen["loss_minus_inoculation"]
    return {
        "n_examples": len(ids),
        "target": "inoculation",
        "target_loss": inoc_loss,
        "reference": reference,
        "candidates": sorted(rows, key=lambda r: r["abs_gap"]),
        "chosen": chosen["name"],
        "chosen_text": chosen["text"],
        "chosen_gap": chosen["abs_gap"],
        # Matched in the sense that the paired CI of the loss difference covers zero.
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
        f"control: chose {table['chosen']} (loss gap {table['chosen_gap']:.4f} to inoculation "
        f"{table['target_loss']:.4f})"
    )


if __name__ == "__main__":
    run_stage(main)
