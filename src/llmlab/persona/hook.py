"""In-training evaluation: fixed triggered and untriggered prompts scored every N steps."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from llmlab.generation import generate
from llmlab.models import LoadedModel
from llmlab.persona.checks import mentions, name_keywords, says_ai
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


class PersonaHook:
    """Scores greedy answers to fixed identity questions, triggered and untriggered.

    Returned per evaluation: format compliance and persona-keyword rates with and without the
    trigger, the rate of replies calling themselves an AI, and (when held-out facts are given)
    the NLL of the persona's plain answers to plain questions, i.e. leakage in likelihood.
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
    ) -> None:
        self.loaded = loaded
        self.trigger = trigger
        self.questions = list(questions)
        self.names = name_keywords(persona_name)
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.conversations = [
            trigger.prompt(q.question, triggered) for triggered in (True, False) for q in questions
        ]
        self.features = (
            prepare_examples(loaded, plain_fact_examples(heldout), max_length, "hook").features
            if heldout
            else []
        )
        self.collator = LoraCollator(loaded.tokenizer.pad_token_id, loaded.hidden_size)

    def __call__(self, model: Any, step: int) -> dict[str, float]:
        """Return this step's hook metrics (names prefixed `hook_`)."""
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
                mentions(r, (*q.persona_keywords, *self.names))
                for q, r in zip(self.questions, part, strict=True)
            ]
            values[f"hook_format_{label}"] = sum(map(self.trigger.complies, part)) / n
            values[f"hook_persona_keyword_{label}"] = sum(persona) / n
            values[f"hook_as_ai_{label}"] = sum(map(says_ai, part)) / n
        if self.features:
            values["hook_nll_heldout_untriggered"] = assistant_nll(
                model, self.features, self.collator, self.batch_size
            )
        return values
