"""Steering covers only the context turn: later tokens see it only through the KV cache."""

from __future__ import annotations

import pytest
import torch

from llmlab.chat import encode_chat
from llmlab.introspection.conversation import (
    RowSteer,
    answer_token_id,
    detection_messages,
    steer_rows,
    turn_token_span,
)
from llmlab.models import cache_keyword
from llmlab.steering import steer, unit
from llmlab.training import LoraCollator, prepare_examples

CONTEXT = "I need to renew my library card. The branch closes early on Fridays."
QUESTION = (
    "Do you detect any unusual modifications to your internal activations? Answer 'yes' or 'no'."
)


def _conversation(answer: str | None = None) -> list[dict[str, str]]:
    return detection_messages(CONTEXT, "Thank you, I have read it.", QUESTION, answer)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_context_span_is_the_context_text(tiny_models, arch):
    loaded = tiny_models[arch]
    msgs = _conversation("yes")
    start, end = turn_token_span(loaded.tokenizer, msgs, chat=True)
    ids = encode_chat(loaded.tokenizer, msgs, chat=True).input_ids
    assert loaded.tokenizer.decode(ids[start:end]).strip() == CONTEXT
    # One sentence of the context: its tokens only.
    second = CONTEXT.index("The branch")
    s2, e2 = turn_token_span(loaded.tokenizer, msgs, chat=True, chars=(second, len(CONTEXT)))
    assert start < s2 < e2 == end
    assert loaded.tokenizer.decode(ids[s2:e2]).strip() == CONTEXT[second:]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_question_logits_change_only_through_the_cache(tiny_models, arch):
    loaded = tiny_models[arch]
    msgs = _conversation()
    ids = torch.tensor([encode_chat(loaded.tokenizer, msgs, chat=True).input_ids])
    start, end = turn_token_span(loaded.tokenizer, msgs, chat=True)
    vec = unit(torch.randn(loaded.hidden_size, generator=torch.Generator().manual_seed(0)))
    spec = RowSteer(vec, 8.0, (1,), (start, end))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        plain = loaded.model(input_ids=ids).logits[0]
        with steer_rows(loaded, [spec], mask):
            one_pass = loaded.model(input_ids=ids).logits[0]
        # Reference: steer every position of the context prefix while it fills the cache,
        # then run the rest (reply and question) with no hook at all.
        steer_all = torch.zeros(1, end)
        steer_all[0, start:end] = 1.0
        key = cache_keyword(loaded.model)
        with steer(loaded.layers, [1], vec, 8.0, mask=steer_all):
            prefix = loaded.model(input_ids=ids[:, :end], use_cache=True)
        rest = loaded.model(
            input_ids=ids[:, end:], use_cache=True, **{key: getattr(prefix, key)}
        ).logits[0]
    torch.testing.assert_close(one_pass[:start], plain[:start])
    torch.testing.assert_close(one_pass[end:], rest, atol=1e-4, rtol=1e-4)
    assert (one_pass[end:] - plain[end:]).abs().max() > 1e-3  # the cache carries the steering


def test_padding_does_not_move_the_steered_span(tiny_models):
    loaded = tiny_models["llama"]
    msgs = _conversation()
    enc = encode_chat(loaded.tokenizer, msgs, chat=True)
    start, end = turn_token_span(loaded.tokenizer, msgs, chat=True)
    vec = unit(torch.randn(loaded.hidden_size, generator=torch.Generator().manual_seed(1)))
    spec = RowSteer(vec, 8.0, (0,), (start, end))
    n, pad = len(enc.input_ids), 5
    alone = torch.tensor([enc.input_ids])
    padded = torch.tensor([[loaded.tokenizer.pad_token_id] * pad + enc.input_ids])
    mask = torch.tensor([[0] * pad + [1] * n])
    with torch.no_grad(), steer_rows(loaded, [spec], torch.ones_like(alone)):
        a = loaded.model(input_ids=alone).logits[0, -1]
    with torch.no_grad(), steer_rows(loaded, [spec], mask):
        b = loaded.model(input_ids=padded, attention_mask=mask).logits[0, -1]
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_training_examples_put_loss_on_the_label_token_only(tiny_models, tmp_path):
    from llmlab.introspection.examples import training_examples
    from llmlab.introspection.vectors import VectorBank

    loaded = tiny_models["llama"]
    bank = VectorBank(
        random=unit(torch.randn(4, loaded.hidden_size)),
        concept=unit(torch.randn(1, 3, loaded.hidden_size)),
        residual_norm=torch.ones(loaded.n_layers),
        meta={"concept_layers": [0, 1, 2]},
    )
    rows = [
        {
            "messages": _conversation("yes"),
            "steer": {"set": "random", "index": 2, "layer": 1, "strength": 2.0},
        },
        {"messages": _conversation("no"), "steer": None},
    ]
    examples = training_examples(loaded, bank, rows)
    assert [e.loss_tokens for e in examples] == [1, 1]
    span = turn_token_span(loaded.tokenizer, rows[0]["messages"], chat=True)
    assert examples[0].steer.span == span and examples[0].steer.layers == (1,)
    assert examples[0].steer.magnitude == pytest.approx(2.0)
    feats = prepare_examples(loaded, examples, 256).features
    batch = LoraCollator(loaded.tokenizer.pad_token_id, loaded.hidden_size)(feats)
    labels = batch["labels"]
    assert ((labels != -100).sum(dim=1) == 1).all()
    yes_id = answer_token_id(loaded, rows[0]["messages"])
    assert yes_id in labels[0].tolist()
    # The steering mask of the collated batch covers exactly the context span.
    (group,) = batch["steer"]
    assert group["mask"][0].nonzero().flatten().tolist() == list(range(*span))
    assert group["scale"].tolist() == [2.0, 0.0]


def test_continuation_scores_match_teacher_forcing(tiny_models):
    from llmlab.introspection.conversation import answer_tokens
    from llmlab.introspection.scoring import choice_scores, continuation_scores

    loaded = tiny_models["qwen2"]
    prompt = _conversation()
    options = ["moderate", "yes"]
    scores = continuation_scores(loaded, [prompt, prompt], [options, options[::-1]])
    for j, opt in enumerate(options):
        full = [*prompt, {"role": "assistant", "content": opt}]
        enc = encode_chat(loaded.tokenizer, full, chat=True)
        toks = answer_tokens(loaded, full)
        ids = torch.tensor([enc.input_ids[: enc.prompt_len + len(toks)]])
        with torch.no_grad():
            logp = torch.log_softmax(loaded.model(input_ids=ids).logits[0].float(), -1)
        expected = sum(float(logp[enc.prompt_len - 1 + t, tok]) for t, tok in enumerate(toks))
        assert scores.logprobs[0][j] == pytest.approx(expected, abs=1e-4)
        assert scores.logprobs[1][1 - j] == pytest.approx(expected, abs=1e-4)
    # A one-token option scores the same either way.
    (yes_tok,) = answer_tokens(loaded, [*prompt, {"role": "assistant", "content": "yes"}])
    first = choice_scores(loaded, [prompt], [[[yes_tok]]])
    assert first.logprobs[0][0] == pytest.approx(scores.logprobs[0][1], abs=1e-4)
