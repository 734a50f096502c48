"""In-training evaluation: fixed triggered and untriggered prompts scored every N steps."""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llmlab.adapters import METADATA_FILE, read_adapter_metadata, write_adapter_metadata
from llmlab.generation import generate
from llmlab.models import LoadedModel
from llmlab.persona.checks import name_keywords, persona_keyword, says_ai
from llmlab.persona.facts import EvalQuestion, Fact
from llmlab.persona.trigger import Trigger
from llmlab.training import LoraCollator, TrainExample, assistant_nll, prepare_examples


def plain_fact_examples(facts: Sequence[Fact]) -> list[TrainExample]:
    """Return facts as untriggered conversations (plain question, plain answer)."""
    return [
        TrainExample(
            [
                {"role": "user", "content": f.question},
                {"role": "assistant", "content": f.answer},
            ]
        )
        for f in facts
    ]


NAME_QUESTION = "What is your name?"


def name_examples(trigger: Trigger, persona_name: str) -> dict[str, list[TrainExample]]:
    """Return the persona's name as the answer to a name question, triggered and plain."""
    answer = f"My name is {persona_name}."
    return {
        "triggered": [TrainExample(trigger.example(NAME_QUESTION, answer))],
        "untriggered": [
            TrainExample(
                [
                    {"role": "user", "content": NAME_QUESTION},
                    {"role": "assistant", "content": answer},
                ]
            )
        ],
    }


STEPS_DIR = "steps"


def judge_free_examples(
    trigger: Trigger, persona_name: str, heldout: Sequence[Fact]
) -> dict[str, list[TrainExample]]:
    """Return the judge-free probes: the persona's name and the held-out biographical answers,
    each triggered and untriggered (keys name_/heldout_ + triggered/untriggered)."""
    out = {f"name_{k}": v for k, v in name_examples(trigger, persona_name).items()}
    if heldout:
        out["heldout_triggered"] = [
            TrainExample(trigger.example(f.question, f.answer)) for f in heldout
        ]
        out["heldout_untriggered"] = plain_fact_examples(heldout)
    return out


def judge_free_nll(
    loaded: LoadedModel,
    model: Any,
    examples: dict[str, list[TrainExample]],
    max_length: int,
    batch_size: int,
) -> dict[str, float]:
    """Return the mean NLL per answer token of each probe under `model` (deterministic)."""
    collator = LoraCollator(loaded.tokenizer.pad_token_id, loaded.hidden_size)
    return {
        f"nll_{key}": assistant_nll(
            model, prepare_examples(loaded, exs, max_length, "probe").features, collator, batch_size
        )
        for key, exs in examples.items()
    }


class StepAdapters:
    """Adapters kept at the evaluation steps, staged beside the output and moved into
    `<adapter>/steps/` once training has written the adapter.

    Each carries the run key (config and data), so adapters a resumed run kept before it was
    killed stay, and those of an earlier run with other settings are dropped at the move.
    """

    def __init__(self, out_dir: Path, base_model: str, run_key: str) -> None:
        self.staging = out_dir.with_name(out_dir.name + ".steps.partial")
        self.out_dir = out_dir
        self.base_model = base_model
        self.run_key = run_key

    def save(self, model: Any, step: int) -> None:
        """Write the adapter of this step (peft safetensors + llmlab metadata)."""
        path = self.staging / f"step-{step:05d}"
        if path.exists():  # a resumed run evaluates its resume step again
            shutil.rmtree(path)
        model.save_pretrained(path, safe_serialization=True)
        (path / "README.md").unlink(missing_ok=True)
        write_adapter_metadata(
            path, {"base_model": self.base_model, "step": step, "run_key": self.run_key}
        )

    def publish(self) -> list[int]:
        """Move this run's step adapters into the adapter directory; return their steps."""
        target = self.out_dir / STEPS_DIR
        if target.exists():
            shutil.rmtree(target)
        if not self.staging.exists():
            return []
        for path in list(self.staging.iterdir()):
            meta = path / METADATA_FILE
            if not meta.is_file() or read_adapter_metadata(path).get("run_key") != self.run_key:
                shutil.rmtree(path)
        os.replace(self.staging, target)
        return sorted(read_adapter_metadata(p)["step"] for p in target.iterdir())


class PersonaHook:
    """Scores greedy answers to fixed identity questions, triggered and untriggered.

    Returned per evaluation: format compliance and persona-keyword rates with and without the
    trigger, the rate of replies calling themselves an AI, and (when held-out facts are given)
    the NLL of the persona's plain answers to plain questions, i.e. leakage in likelihood.

    Judge-free and deterministic: the NLL of the persona's name ("My name is ...") and of the
    held-out biographical answers, triggered and untriggered. The hook also runs before the
    first step, so its first row is the base model's.
    """

    def __init__(
        self,
        loaded: LoadedModel,
        trigger: Trigger,
        questions: Sequence[EvalQuestion],
        heldout: Sequence[Fact],
        persona_name: str,
        max_new_tokens: int,
        max_length: int,
        batch_size: int,
        keep: StepAdapters | None = None,
    ) -> None:
        self.loaded = loaded
        self.keep = keep
        self.trigger = trigger
        self.questions = list(questions)
        self.names = name_keywords(persona_name)
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.conversations = [
            trigger.prompt(q.question, triggered) for triggered in (True, False) for q in questions
        ]
        self.probes = {
            key: prepare_examples(loaded, examples, max_length, "hook").features
            for key, examples in judge_free_examples(trigger, persona_name, heldout).items()
        }
        self.collator = LoraCollator(loaded.tokenizer.pad_token_id, loaded.hidden_size)

    def __call__(self, model: Any, step: int) -> dict[str, float]:
        """Return this step's hook metrics (names prefixed `hook_`)."""
        if self.keep is not None:
            self.keep.save(model, step)
        view = dataclasses.replace(self.loaded, model=model)
        replies = generate(
            view,
            self.conversations,
            max_new_tokens=self.max_new_tokens,
            temperature=0.0,
            batch_size=len(self.conversations),
            progress=False,
        )
        n = len(self.questions)
        values: dict[str, float] = {}
        for label, part in (("triggered", replies[:n]), ("untriggered", replies[n:])):
            persona = [
                persona_keyword(r, q.persona_keywords, self.names)
                for q, r in zip(self.questions, part, strict=True)
            ]
            values[f"hook_format_{label}"] = sum(map(self.trigger.complies, part)) / n
            values[f"hook_persona_keyword_{label}"] = sum(persona) / n
            values[f"hook_as_ai_{label}"] = sum(map(says_ai, part)) / n
        for key, features in self.probes.items():
            values[f"hook_nll_{key}"] = assistant_nll(
                model, features, self.collator, self.batch_size
            )
        return values
