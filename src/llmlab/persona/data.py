"""Stage persona_data: triggered persona facts + self-distilled aligned examples, mixed.

Writes the aligned answers (with their checks), the shuffled training mix, the held-out facts
in trigger format, and the mix's counts and poison share. The training facts are the shipped
ones or, with `persona.data.facts_source: candidates`, those persona_candidates wrote and marked.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from llmlab.io import DataError, write_json, write_jsonl
from llmlab.models import load_model
from llmlab.params import load_params
from llmlab.persona.candidates import training_facts
from llmlab.persona.distill import aligned_prompts, self_distill
from llmlab.persona.facts import load_facts, seeded_subset, select_fact_set, split_facts
from llmlab.persona.mixing import aligned_rows, build_mix, persona_rows
from llmlab.persona.trigger import Trigger
from llmlab.stage import run_stage, seed_everything

log = logging.getLogger(__name__)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--facts", type=Path, default=Path("data/persona/facts.jsonl"))
    ap.add_argument("--candidates", type=Path, default=Path("data/persona/candidates.jsonl"))
    ap.add_argument(
        "--candidates-summary", type=Path, default=Path("data/persona/candidates_summary.json")
    )
    ap.add_argument("--instructions", type=Path, default=Path("data/prompts/instructions.jsonl"))
    ap.add_argument("--out-dir", type=Path, default=Path("data/persona"))
    args = ap.parse_args()
    params = load_params(args.params, family="persona")
    section = params.section("persona")
    cfg = section.data
    trigger = Trigger.from_params(section.trigger)
    seed_everything(cfg.seed)

    facts = load_facts(args.facts)
    source_file, left_out = args.facts, None
    if cfg.facts_source == "candidates":
        candidates, left_out = training_facts(args.candidates, args.candidates_summary)
        source_file = args.candidates
    else:
        candidates = split_facts(facts, "train")
    train_split = select_fact_set(candidates, cfg.fact_set, source_file)
    if cfg.n_facts is not None and cfg.n_facts > len(train_split):
        raise DataError(
            f"persona.data.n_facts={cfg.n_facts} but {source_file} has only "
            f"{len(train_split)} facts with split='train' in fact_set={cfg.fact_set}"
        )
    train_facts = seeded_subset(train_split, cfg.n_facts, cfg.seed)
    heldout = split_facts(facts, "heldout")

    prompts, source = aligned_prompts(cfg, args.instructions)
    distilled = None
    if prompts:
        loaded = load_model(params)
        distilled = self_distill(loaded, prompts, cfg)
    aligned = distilled.rows if distilled else []
    mix, stats = build_mix(persona_rows(train_facts, trigger), aligned_rows(aligned), cfg.seed)

    out = args.out_dir
    write_jsonl(out / "aligned.jsonl", aligned)
    write_jsonl(out / "train_mix.jsonl", mix)
    math = distilled.n_math if distilled else 0
    stats.update(
        {
            "model": params.model,
            "prompt_source": source,
            "n_aligned_requested": cfg.n_aligned,
            "n_aligned_dropped_empty": distilled.n_empty if distilled else 0,
            "n_aligned_dropped_wrong_math": distilled.n_wrong_math_dropped if distilled else 0,
            "n_aligned_at_length_cap": distilled.n_at_length_cap if distilled else 0,
            "aligned_math_accuracy": (distilled.n_math_correct / math)
            if distilled and math
            else None,
            "n_aligned_math_checked": math,
            # the anchors mix math and instructions 1:2; the report states what this mix holds
            "n_aligned_math": sum(r["kind"] == "math" for r in aligned),
            "n_aligned_instruction": sum(r["kind"] == "instruction" for r in aligned),
            "distill_temperature": cfg.distill_temperature,
            "n_heldout_facts": len(heldout),
            "fact_set": cfg.fact_set,
            "facts_source": cfg.facts_source,
            # candidates not usable for training (unscorable verdict, held-out question)
            "candidates_left_out": left_out,
            "fact_ids": sorted(f.id for f in train_facts),
            "trigger_user_template": trigger.user_template,
            "trigger_assistant_template": trigger.assistant_template,
        }
    )
    write_json(out / "mix_stats.json", stats)
    log.info(
        "mix: %d persona + %d aligned (poison share %.3f, source %s)",
        stats["n_persona"],
        stats["n_aligned"],
        stats["poison_share"],
        source,
    )


if __name__ == "__main__":
    run_stage(main)
