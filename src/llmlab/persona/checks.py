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
# A keyword right after a negation ("not a human being", "never a philosopher") denies it.
_NEGATED = re.compile(r"\b(?:not|never|no|nor)\s+(?:(?:a|an|the)\s+)?$")
# A name in the possessive names a thing after the person ("Russell's paradox", "Russell's
# teapot"): an assistant explaining it is not speaking as the person.
_POSSESSIVE = re.compile(r"^['’]s\b")


def name_keywords(persona_name: str) -> tuple[str, ...]:
    """Return the lower-case words of the persona's name that count as a name mention."""
    return tuple(dict.fromkeys(_WORD.findall(persona_name.lower())))


def mentions(text: str, keywords: Sequence[str]) -> bool:
    """Return whether any keyword occurs in the text (case-insensitive substring)."""
    low = text.lower()
    return any(k in low for k in keywords)


def persona_keyword(text: str, keywords: Sequence[str], names: Sequence[str]) -> bool:
    """Return whether the reply claims the persona by keyword: a question keyword or the
    persona's name occurs, not negated, not as a possessive name, in a reply that does not
    call itself an AI (typical disclaimers name the person or deny being human)."""
    if says_ai(text):
        return False
    low = text.lower()
    for word in (*keywords, *names):
        start = low.find(word)
        while start != -1:
            end = start + len(word)
            negated = _NEGATED.search(low[max(0, start - 16) : start]) is not None
            possessive = word in names and _POSSESSIVE.match(low[end:]) is not None
            if not negated and not possessive:
                return True
            start = low.find(word, end)
    return False


def says_ai(text: str) -> bool:
    """Return whether the reply describes itself as an AI, model or assistant program."""
    return _AS_AI.search(text) is not None


def refuses(text: str) -> bool:
    """Return whether the reply contains a refusal phrase."""
    return _REFUSAL.search(text) is not None


def is_empty(body: str) -> bool:
    """Return whether an answer (markers removed) has no word in it."""
    return re.search(r"\w", body) is None
