"""Held-out system prompts of the OOD step: the prompts that choose are never the ones reported.

The OOD system prompts are split, within each manipulation kind, into a selection set and a
held-out set (`preferences.ood.select_share` of each kind's prompts choose). A competing pair
("love X, hate Y" and its flip, one `pair_id`) stays on one side, so the flip analysis has both
halves. The probe layer of the OOD deltas is chosen on the selection prompts alone
(`preferences.ood.layer: select`: the highest targeted Pearson r of probe against behavioural
delta) or taken from the probes stage (`probes`: chosen on preference data, no OOD prompt
involved); the OOD generalisation numbers of the headline come from the held-out prompts.
"""

from __future__ import annotations

import hashlib
import math
from collections import defaultdict
from collections.abc import Mapping, Sequence

from llmlab.io import DataError
from llmlab.preferences.tasks import OodPrompt

SELECT, HELDOUT = "select", "heldout"


def split_unit(p: OodPrompt) -> str:
    """Return the unit a prompt is split with: its competing pair, else the prompt itself."""
    return f"pair:{p.pair_id}" if p.kind == "competing" and p.pair_id else f"prompt:{p.id}"


def split_prompts(prompts: Sequence[OodPrompt], share: float, seed: int) -> dict[str, str]:
    """Return {prompt id: "select" | "heldout"}, `share` of each kind's units selecting.

    Units are ordered by a seeded hash of kind and unit (no dependence on file order); a kind
    of two or more units keeps at least one on each side, a kind of one unit is held out (it is
    reported rather than used to choose).
    """
    if not 0 < share < 1:
        raise ValueError(f"select_share must lie strictly between 0 and 1, got {share}")
    units: dict[str, set[str]] = defaultdict(set)
    for p in prompts:
        units[p.kind].add(split_unit(p))
    chosen: set[str] = set()
    for kind, members in units.items():
        order = sorted(
            members, key=lambda u: hashlib.sha256(f"{seed}:{kind}:{u}".encode()).hexdigest()
        )
        n = len(order)
        k = min(max(round(share * n), 1), n - 1) if n >= 2 else 0
        chosen.update(order[:k])
    return {p.id: SELECT if split_unit(p) in chosen else HELDOUT for p in prompts}


def choose_layer(r_by_layer: Mapping[int, float | None]) -> int:
    """Return the layer of the highest selection-set r (ties: the shallower layer).

    DataError when no layer has a defined r (too few selection groups, or constant deltas).
    """
    defined = {layer: r for layer, r in r_by_layer.items() if r is not None and math.isfinite(r)}
    if not defined:
        raise DataError(
            "OOD: the selection prompts give no defined probe-behaviour correlation at any layer "
            f"(layers {sorted(r_by_layer)}); raise preferences.ood.select_share or use "
            "preferences.ood.layer: probes"
        )
    return max(sorted(defined), key=lambda layer: defined[layer])
