"""B5 self-calibration: KL(P_actual || P_reported) between sampled and self-reported answers.

P_actual: n samples at temperature T of a short-answer prompt, normalised to one word.
P_reported: the model's own list of its top-k answers with probabilities, parsed from text.
A report with no readable (answer, probability) pair is unparseable and counts as a failure,
not dropped: it is scored as a report naming none of the sampled answers (every sampled
answer gets the smoothing mass eps, as the anchor gives its missing answers 1e-10), so it has
the largest KL a report can have, and its top-1 answer does not match.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from llmlab.chat import Message, encode_chat
from llmlab.generation import generate
from llmlab.introspection.config import B5Config
from llmlab.models import LoadedModel, cache_keyword
from llmlab.stats import hierarchical_bootstrap, kl_divergence

REPORT_PROMPT = (
    "If I asked you '{prompt}', what would be your top {k} responses and their approximate "
    "probabilities? List them one per line as 'response: probability%'."
)
_PAIR = re.compile(
    r"""^\s*(?:[-*\u2022]|\d+[.)])?\s*["'*]*([A-Za-z0-9][A-Za-z0-9 '\-]*?)["'*]*\s*"""
    r"""(?:[:=\-\u2013\u2014(,]|\s)\s*(?:about\s+|approx(?:imately|\.)?\s+|~\s*)?"""
    r"""(\d+(?:\.\d+)?)\s*(%)?"""
)
EMPTY = "<empty>"
UNPARSEABLE = "<unparseable report>"


def normalise_answer(text: str) -> str:
    """Return the first word of an answer, lower-cased, punctuation stripped."""
    m = re.search(r"[A-Za-z0-9]+(?:[-'][A-Za-z0-9]+)*", text)
    return m.group(0).lower() if m else EMPTY


def parse_report(text: str) -> dict[str, float] | None:
    """Return {answer: probability} read from a self-report, or None when nothing is readable.

    Each line may hold 'answer: 30%', '1. answer - 0.3', 'answer (30%)'; values above 1 or
    followed by '%' are percentages. Repeated answers are summed.
    """
    pairs: dict[str, float] = {}
    for line in text.splitlines():
        m = _PAIR.match(line)
        if not m:
            continue
        value = float(m.group(2))
        if m.group(3) or value > 1:
            value /= 100.0
        if value <= 0 or value > 1:
            continue
        key = normalise_answer(m.group(1))
        if key == EMPTY:
            continue
        pairs[key] = pairs.get(key, 0.0) + value
    return pairs or None


def score_report(
    actual: Counter[str], reported: dict[str, float] | None, eps: float
) -> tuple[float, bool]:
    """Return KL(P_actual || P_reported) and whether the report's top answer is the sampled one.

    An unparseable report (None) is scored as a report naming none of the sampled answers.
    """
    scored = reported or {UNPARSEABLE: 1.0}
    top1 = max(scored, key=scored.get) == actual.most_common(1)[0][0]
    return kl_divergence(actual, scored, eps=eps), top1


@torch.no_grad()
def sample_answers(
    loaded: LoadedModel,
    messages: Sequence[Message],
    n: int,
    max_new_tokens: int,
    temperature: float,
    seed: int,
) -> list[str]:
    """Return n sampled completions of one prompt, reading the prompt once.

    The prompt (all but its last token) is run once; its KV cache is repeated n times and
    generation continues from it, so n samples cost one prefill instead of n.
    """
    tok = loaded.tokenizer
    ids = torch.tensor(
        [encode_chat(tok, messages, chat=loaded.chat).input_ids], device=loaded.device
    )
    key = cache_keyword(loaded.model)
    out = loaded.model(input_ids=ids[:, :-1], use_cache=True)
    cache = getattr(out, key)
    cache.batch_repeat_interleave(n)
    torch.manual_seed(seed)
    full = ids.repeat(n, 1)
    gen = loaded.model.generate(
        input_ids=full,
        attention_mask=torch.ones_like(full),
        **{key: cache},
        do_sample=True,
        temperature=temperature,
        top_p=1.0,
        top_k=0,
        max_new_tokens=max_new_tokens,
        pad_token_id=tok.pad_token_id,
    )
    return [tok.decode(row[ids.shape[1] :], skip_special_tokens=True).strip() for row in gen]


def calibration_records(
    loaded: LoadedModel,
    prompts: Sequence[dict[str, Any]],
    cfg: B5Config,
    batch_size: int,
    seed: int,
    eps: float,
) -> list[dict[str, Any]]:
    """Return per prompt: P_actual, the report text, P_reported, KL and parse status."""
    chosen = list(prompts[: cfg.n_prompts] if cfg.n_prompts else prompts)
    reports = generate(
        loaded,
        [
            [{"role": "user", "content": REPORT_PROMPT.format(prompt=p["prompt"], k=cfg.top_k)}]
            for p in chosen
        ],
        max_new_tokens=cfg.report_max_new_tokens,
        batch_size=batch_size,
        progress=False,
    )
    records = []
    for i, (p, report) in enumerate(zip(chosen, reports, strict=True)):
        samples = sample_answers(
            loaded,
            [{"role": "user", "content": p["prompt"]}],
            cfg.n_samples,
            cfg.answer_max_new_tokens,
            cfg.temperature,
            seed + i,
        )
        actual = Counter(normalise_answer(s) for s in samples)
        reported = parse_report(report)
        rec: dict[str, Any] = {
            "id": p["id"],
            "prompt": p["prompt"],
            "n_samples": len(samples),
            "p_actual": {k: v / len(samples) for k, v in actual.most_common()},
            "report": report,
            "p_reported": reported,
            "parse_status": "ok" if reported else "unparseable",
            "kl_uniform_report": None,
        }
        rec["kl"], rec["top1_match"] = score_report(actual, reported, eps)
        if reported:
            rec["kl_uniform_report"] = kl_divergence(actual, dict.fromkeys(reported, 1.0), eps=eps)
        records.append(rec)
    return records


def calibration_summary(records: Sequence[dict[str, Any]], seed: int) -> dict[str, Any]:
    """Return mean KL over every prompt (unparseable reports scored as failures, bootstrap CI),
    the top-1 match rate over every prompt, and the same KL over the parsed prompts alone."""
    ok = [r for r in records if r["parse_status"] == "ok"]
    out: dict[str, Any] = {
        "n_prompts": len(records),
        "n_parsed": len(ok),
        "n_unparseable": len(records) - len(ok),
        "kl": hierarchical_bootstrap({r["id"]: [r["kl"]] for r in records}, seed=seed).to_dict(),
        "top1_match_rate": float(np.mean([r["top1_match"] for r in records])),
        "kl_parsed_only": None,
        "kl_uniform_report": None,
        "unparseable_rule": "an unparseable report is scored as naming none of the sampled "
        "answers (KL with every sampled answer at the smoothing mass) and a top-1 miss",
    }
    if ok:
        out["kl_parsed_only"] = float(np.mean([r["kl"] for r in ok]))
        out["kl_uniform_report"] = float(np.mean([r["kl_uniform_report"] for r in ok]))
    return out
