"""Pure parsers turning judge replies (first-token logprobs or text) into labels and scores."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Literal

# Minimum probability mass that must sit on readable answers for a logprob reading to count.
MIN_MASS = 0.25

# Word-piece markers some servers leave in token strings (SentencePiece and byte-level BPE).
_PIECE_MARKERS = "\u2581\u0120"
_INT_RE = re.compile(r"^\d{1,3}$")
_WORD_RE = re.compile(r"[A-Za-z]+|\d+")


def normalize_token(token: str) -> str:
    """Return the token without surrounding whitespace or word-piece markers, lower-cased."""
    return token.strip().strip(_PIECE_MARKERS).strip().lower()


def yes_no_mass(logprobs: Mapping[str, float]) -> tuple[float, float]:
    """Return (P(yes), P(no)) summed over case and spacing variants of the two words."""
    p_yes = p_no = 0.0
    for token, lp in logprobs.items():
        word = normalize_token(token)
        if word == "yes":
            p_yes += math.exp(lp)
        elif word == "no":
            p_no += math.exp(lp)
    return p_yes, p_no


def parse_yes_no_logprobs(
    logprobs: Mapping[str, float], min_mass: float = MIN_MASS
) -> float | None:
    """Return P(yes) / (P(yes) + P(no)), or None when yes+no hold less than `min_mass`."""
    p_yes, p_no = yes_no_mass(logprobs)
    total = p_yes + p_no
    if total <= 0.0 or total < min_mass:
        return None
    return p_yes / total


def parse_yes_no_text(text: str) -> Literal["YES", "NO"] | None:
    """Return "YES" or "NO" when the first word of `text` is yes/no (any case), else None."""
    match = _WORD_RE.search(text)
    if match is None:
        return None
    word = match.group(0).lower()
    if word == "yes":
        return "YES"
    if word == "no":
        return "NO"
    return None


def int_0_100(token: str) -> int | None:
    """Return the integer a token spells when it is a plain integer in [0, 100], else None."""
    t = normalize_token(token)
    if not _INT_RE.match(t):
        return None
    k = int(t)
    return k if k <= 100 else None


def aggregate_0_100(
    logprobs: Mapping[str, float], min_mass: float = MIN_MASS
) -> tuple[float | None, float]:
    """Return (expected score, numeric mass) over tokens that are integers in [0, 100].

    The score is sum(k * p(k)) / sum(p(k)); it is None when less than `min_mass` of the
    probability sits on such tokens, since the judge then mostly did not answer with a number.
    """
    mass = weighted = 0.0
    for token, lp in logprobs.items():
        k = int_0_100(token)
        if k is None:
            continue
        p = math.exp(lp)
        mass += p
        weighted += k * p
    if mass <= 0.0 or mass < min_mass:
        return None, mass
    return weighted / mass, mass


def parse_int_text(text: str) -> int | None:
    """Return the leading integer of `text` when it lies in [0, 100], else None."""
    match = re.match(r"\s*(\d{1,3})(?!\d)", text)
    if match is None:
        return None
    k = int(match.group(1))
    return k if k <= 100 else None
