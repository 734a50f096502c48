"""LLM judge: yes/no and 0-100 questions to an OpenAI-compatible server or a local model."""

from .base import JudgeBackend, JudgeError, JudgeReply, JudgeRequestFailed, to_messages
from .config import JudgeConfig
from .judge import Judge, JudgeCounts, JudgeFailed, Score, Verdict, count_statuses, make_judge
from .parsing import aggregate_0_100, parse_yes_no_logprobs, parse_yes_no_text

__all__ = [
    "Judge",
    "JudgeBackend",
    "JudgeConfig",
    "JudgeCounts",
    "JudgeError",
    "JudgeFailed",
    "JudgeReply",
    "JudgeRequestFailed",
    "Score",
    "Verdict",
    "aggregate_0_100",
    "count_statuses",
    "make_judge",
    "parse_yes_no_logprobs",
    "parse_yes_no_text",
    "to_messages",
]
