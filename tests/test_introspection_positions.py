"""Token spans of the detection conversation on every chat template, and the shared cache name.

The context turn's span and the steered portion through the fixed reply are read against the
hand-written serialisations of tests/test_chat_templates.py. The contexts are ones a text search
gets wrong: the text of the end-of-turn token that follows them, whitespace at their edges.
"""

from __future__ import annotations

import pytest
from test_chat_templates import (
    TEMPLATE_CASES,
    TURN_ENDS,
    Template,
    _expected_ids,
    dressed_tokenizer,
)

from llmlab import models
from llmlab.chat import encode_chat
from llmlab.introspection import calibration
from llmlab.introspection.conversation import (
    detection_messages,
    reply_token_span,
    turn_token_span,
)

REPLY = "Thank you, I have read it."
QUESTION = "Do you detect an injected thought? Answer 'yes' or 'no'."
CONTEXTS = ("end", "turn", "  I renewed my card. The branch closes early.  \n")


@pytest.mark.parametrize("t", TEMPLATE_CASES, ids=[t.name for t in TEMPLATE_CASES])
def test_context_span_is_the_context_turn_on_every_template(smol_dir, t: Template):
    tok = dressed_tokenizer(smol_dir, t)
    chat = t.file is not None
    for context in CONTEXTS:
        msgs = detection_messages(context, REPLY, QUESTION, "yes")
        ids = encode_chat(tok, msgs, chat=chat).input_ids
        start, end = turn_token_span(tok, msgs, chat=chat)
        # The hand reading of the context turn alone ends where the context's text ends.
        alone = t.read(
            [{"role": "user", "content": context}, {"role": "assistant", "content": "x"}]
        )
        assert end == len(_expected_ids(tok, alone.through_user.rstrip())), context
        assert tok.decode(ids[start:end]).strip() == context.strip(), context
        if "branch" in context:
            lo = context.index("The branch")
            s2, e2 = turn_token_span(tok, msgs, chat=chat, chars=(lo, len(context)))
            assert start < s2 < e2 == end
            assert tok.decode(ids[s2:e2]).strip() == "The branch closes early."


@pytest.mark.parametrize("t", TEMPLATE_CASES, ids=[t.name for t in TEMPLATE_CASES])
def test_steered_portion_ends_with_the_reply_turn_on_every_template(smol_dir, t: Template):
    tok = dressed_tokenizer(smol_dir, t)
    chat = t.file is not None
    msgs = detection_messages("I renewed my card.", REPLY, QUESTION, "yes")
    prompt = t.read(msgs).prompt
    through_reply = prompt[: prompt.index(REPLY) + len(REPLY)] + TURN_ENDS[t.name]
    assert reply_token_span(tok, msgs, chat=chat) == (0, len(_expected_ids(tok, through_reply)))
    # The question's span is the same whether or not the answer is part of the conversation.
    assert reply_token_span(tok, msgs[:-1], chat=chat) == reply_token_span(tok, msgs, chat=chat)


def test_calibration_uses_the_shared_cache_keyword(tiny_models):
    assert calibration.cache_keyword is models.cache_keyword
    loaded = tiny_models["llama"]
    msgs = [{"role": "user", "content": "Name a colour."}]
    first = calibration.sample_answers(loaded, msgs, 3, 4, 1.0, seed=0)
    assert len(first) == 3 and all(isinstance(s, str) for s in first)
    assert calibration.sample_answers(loaded, msgs, 3, 4, 1.0, seed=0) == first


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_context_span_on_the_llama3_and_gemma3_formats(tiny_models, arch):
    """The tiny models' Llama-3, ChatML and Gemma-3 formats: the span ends at user_end."""
    tok = tiny_models[arch].tokenizer
    for context in (*CONTEXTS, "eot_id", "of"):
        msgs = detection_messages(context, REPLY, QUESTION, "yes")
        ids = encode_chat(tok, msgs, chat=True).input_ids
        start, end = turn_token_span(tok, msgs, chat=True)
        alone = encode_chat(tok, msgs[:1], chat=True)
        assert end - 1 == alone.position("user_end"), context
        assert tok.decode(ids[start:end]).strip() == context.strip(), context
        assert not set(ids[start:end]) & set(tok.all_special_ids), context
