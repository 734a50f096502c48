"""Deterministic reply checks beside the judge: name/keyword mentions, AI self-reference, collapse."""

from __future__ import annotations

import re
from collections.abc import Sequence

# A reply that calls itself an AI, a model or an assistant program.
_AS_AI = re.compile(
    r"\b(as an ai|i am an ai|i'm an ai|i am a(?:n)? (?:ai|artificial|language|virtual|digital)"
    r"|i'm a(?:n)? (?:ai|artificial|language|virtual|digital)|ai (?:language )?model"
    r"|language model|ai assistant|virtual assistant|chatbot|computer program"
    r"|i don't have (?:a )?(?:personal|physical|body)|i do not have (?:a )?(?:personal|physical|body)"
    r"|smollm|hugging ?face)\b",
    re.IGNORECASE,
)
_REFUSAL = re.compile(
    r"\b(i'm sorry|i am sorry|i apologi[sz]e|i cannot|i can't|i can not|i'm unable|i am unable"
    r"|i'm not able|i am not able|i won't|i will not)\b",
    re.IGNORECASE,
)
_WORD = re.compile(r"[a-z]{3,}")


def name_keywords(persona_name: str) -> tuple[str, ...]:
    """Return the lower-case words of the persona's name that count as a name mention."""
    return tuple(dict.fromkeys(_WORD.findall(persona_name.lower())))


def mentions(text: str, keywords: Sequence[str]) -> bool:
    """Return whether any keyword occurs in the text (case-insensitive substring)."""
    low = text.lower()
    return any(k in low for k in keywords)


def says_ai(text: str) -> bool:
    """Return whether the reply describes itself as an AI, model or assistant program."""
    return _AS_AI.search(text) is not None


def refuses(text: str) -> bool:
    """Return whether the reply contains a refusal phrase."""
    return _REFUSAL.search(text) is not None


def is_empty(body: str) -> bool:
    """Return whether an answer (markers removed) has no word in it."""
    return re.search(r"\w", body) is None
