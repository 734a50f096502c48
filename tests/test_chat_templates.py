"""Positions and loss masks on real chat templates, read against a hand-written serialisation.

Each template under tests/data/templates/ is the chat template text its model publishes in
tokenizer_config.json; the tokenizer is the embedded SmolLM2 tokenizer dressed with that model's
special tokens (with the same strip flags), and the weights are tiny and random. For every
template and conversation the test writes the serialisation by hand from the model's documented
format (`expected_*` below), tokenises it, and checks `encode_chat`'s positions, the loss tokens
and the activations read at the positions in a padded batch against that reading. Run with
`-s` to see the table of every position's token.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from llmlab.chat import ChatError, collate, encode_chat
from llmlab.hooks import record_layers
from llmlab.models import load_model
from llmlab.params import parse_params

TEMPLATES = Path(__file__).parent / "data" / "templates"
SYSTEM = "Be brief."
QUESTION = "What is two plus two?"
ANSWER = "Four, of course."

Message = dict[str, str]


@dataclass(frozen=True)
class Reading:
    """A conversation serialised by hand from the model's documented format."""

    prompt: str  # the generation prompt
    lead: str  # what the template writes between the generation prompt and the answer
    answer: str  # the answer's content as the template writes it
    end_of_turn: str  # the end-of-turn token's text ("" when the tokenizer's EOS is appended)
    through_user: str  # the text up to the end of the last user message's content


def _turns(conv: list[Message]) -> tuple[str | None, list[Message], str]:
    system = conv[0]["content"] if conv[0]["role"] == "system" else None
    body = conv[1:] if system is not None else conv
    return system, body[:-1], body[-1]["content"]


def _chatml(
    default_system: str | None, prompt_tail: str, lead: str
) -> Callable[[list[Message]], Reading]:
    def read(conv: list[Message]) -> Reading:
        system, history, answer = _turns(conv)
        system = system if system is not None else default_system
        text = f"<|im_start|>system\n{system}<|im_end|>\n" if system is not None else ""
        through_user = ""
        for m in history:
            text += f"<|im_start|>{m['role']}\n{m['content']}"
            if m["role"] == "user":
                through_user = text.rstrip()
            text += "<|im_end|>\n"
        prompt = text + "<|im_start|>assistant\n" + prompt_tail
        return Reading(prompt, lead, answer, "<|im_end|>", through_user)

    return read


def expected_mistral(conv: list[Message]) -> Reading:
    # Mistral v0.3: the system text goes before the last user message of the generation prompt.
    system, history, answer = _turns(conv)
    last_user = max(i for i, m in enumerate(history) if m["role"] == "user")
    text, through_user = "<s>", ""
    for i, m in enumerate(history):
        if m["role"] == "user":
            head = system + "\n\n" if system is not None and i == last_user else ""
            text += "[INST] " + head + m["content"]
            through_user = text.rstrip()
            text += "[/INST]"
        else:
            text += " " + m["content"].strip() + "</s>"
    return Reading(text, " ", answer.strip(), "</s>", through_user)


def expected_gemma2(conv: list[Message]) -> Reading:
    # Gemma-2 refuses system messages: the system text is folded into the first user turn.
    system, history, answer = _turns(conv)
    text, through_user = "<bos>", ""
    for i, m in enumerate(history):
        role = "model" if m["role"] == "assistant" else "user"
        content = m["content"]
        if i == 0 and system is not None:
            content = system + "\n\n" + content
        text += f"<start_of_turn>{role}\n{content.strip()}"
        if role == "user":
            through_user = text
        text += "<end_of_turn>\n"
    prompt = text + "<start_of_turn>model\n"
    return Reading(prompt, "", answer.strip(), "<end_of_turn>", through_user)


def expected_phi3_5(conv: list[Message]) -> Reading:
    system, history, answer = _turns(conv)
    text = f"<|system|>\n{system}<|end|>\n" if system else ""
    through_user = ""
    for m in history:
        text += f"<|{m['role']}|>\n{m['content']}"
        if m["role"] == "user":
            through_user = text.rstrip()
        text += "<|end|>\n"
    return Reading(text + "<|assistant|>\n", "", answer, "<|end|>", through_user)


def expected_plain(conv: list[Message]) -> Reading:
    turns, through_user = [], ""
    for m in conv[:-1]:
        turns.append(f"{m['role'].capitalize()}: {m['content'].strip()}")
        if m["role"] == "user":
            through_user = "\n\n".join(turns)
    prompt = "\n\n".join(turns) + "\n\nAssistant:"
    return Reading(prompt, " ", conv[-1]["content"].strip(), "", through_user)


@dataclass(frozen=True)
class Template:
    """One model family's chat format: template file, tokenizer dressing, tiny architecture."""

    name: str
    file: str | None  # None: the plain base-model format
    arch: str
    read: Callable[[list[Message]], Reading]
    gen_prompt_text: str  # the generation prompt's own text, for the repeat-the-template case
    specials: tuple[str, ...] = ()
    rstrip_specials: tuple[str, ...] = ()
    plain_added: tuple[str, ...] = ()
    bos: str | None = None
    eos: str = "<|im_end|>"
    enable_thinking: bool | None = None


TEMPLATE_CASES = [
    Template(
        "smollm2",
        "smollm2.jinja",
        "llama",
        _chatml("You are a helpful AI assistant named SmolLM, trained by Hugging Face", "", ""),
        "<|im_start|>assistant\n",
    ),
    Template(
        "qwen2.5",
        "qwen2_5.jinja",
        "qwen2",
        _chatml("You are Qwen, created by Alibaba Cloud. You are a helpful assistant.", "", ""),
        "<|im_start|>assistant\n",
    ),
    Template(
        "qwen3",
        "qwen3.jinja",
        "qwen3",
        _chatml(None, "<think>\n\n</think>\n\n", ""),
        "<|im_start|>assistant\n",
        plain_added=("<think>", "</think>"),
        enable_thinking=False,
    ),
    Template(
        "qwen3-thinking",
        "qwen3.jinja",
        "qwen3",
        _chatml(None, "", "<think>\n\n</think>\n\n"),
        "<|im_start|>assistant\n",
        plain_added=("<think>", "</think>"),
    ),
    Template(
        "mistral",
        "mistral_v0_3.jinja",
        "mistral",
        expected_mistral,
        "[/INST]",
        specials=("<s>", "</s>", "[INST]", "[/INST]"),
        bos="<s>",
        eos="</s>",
    ),
    Template(
        "gemma2",
        "gemma2.jinja",
        "gemma2",
        expected_gemma2,
        "<start_of_turn>model\n",
        specials=("<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"),
        bos="<bos>",
        eos="<eos>",
    ),
    Template(
        "phi3.5",
        "phi3_5.jinja",
        "phi3",
        expected_phi3_5,
        "<|assistant|>\n",
        specials=("<s>", "<|endoftext|>"),
        rstrip_specials=("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
        eos="<|endoftext|>",
    ),
    Template("plain", None, "llama", expected_plain, "Assistant:"),
]


def case(name: str) -> Template:
    """Return the template case of that name."""
    return next(t for t in TEMPLATE_CASES if t.name == name)


def conversations(t: Template) -> dict[str, list[Message]]:
    """Return the conversations every template is read on."""
    user = {"role": "user", "content": QUESTION}
    answer = {"role": "assistant", "content": ANSWER}
    system = {"role": "system", "content": SYSTEM}
    return {
        "system": [system, user, answer],
        "no-system": [user, answer],
        "multi-turn": [
            system,
            {"role": "user", "content": "Name a colour."},
            {"role": "assistant", "content": "Blue."},
            user,
            answer,
        ],
        # A short message whose text occurs again later (in "assistant", in the answer).
        "short-repeated": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "a"}],
        # A user message repeating the template's own generation prompt.
        "repeats-template": [{"role": "user", "content": t.gen_prompt_text}, answer],
    }


def dressed_tokenizer(smol_dir: Path, t: Template):
    """Return the embedded tokenizer with `t`'s template, special tokens and BOS/EOS."""
    from tokenizers import AddedToken
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smol_dir)
    specials = [AddedToken(s, special=True, normalized=False) for s in t.specials]
    specials += [
        AddedToken(s, special=True, normalized=False, rstrip=True) for s in t.rstrip_specials
    ]
    if specials:
        tok.add_special_tokens({"additional_special_tokens": specials})
    if t.plain_added:
        tok.add_tokens([AddedToken(s, special=False, normalized=False) for s in t.plain_added])
    if t.file is not None:
        tok.chat_template = (TEMPLATES / t.file).read_text()
    tok.eos_token = t.eos
    if t.bos is not None:
        tok.bos_token = t.bos
        tok.add_bos_token = True
    tok.pad_token = tok.eos_token
    return tok


def tiny_config(arch: str, tok):
    """Return a 3-layer, 64-wide config of `arch` sized to the tokenizer."""
    from transformers import (
        Gemma2Config,
        LlamaConfig,
        MistralConfig,
        Phi3Config,
        Qwen2Config,
        Qwen3Config,
    )

    common = dict(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
    )
    classes = {
        "llama": LlamaConfig,
        "qwen2": Qwen2Config,
        "qwen3": Qwen3Config,
        "mistral": MistralConfig,
        "phi3": Phi3Config,
    }
    if arch == "gemma2":
        return Gemma2Config(**common, head_dim=16)
    return classes[arch](**common)


@pytest.fixture(scope="module")
def template_models(smol_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """Return {template name: LoadedModel}, loaded through the registry with the default runtime."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("templates")
    loaded = {}
    for t in TEMPLATE_CASES:
        tok = dressed_tokenizer(smol_dir, t)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(tiny_config(t.arch, tok))
        model.save_pretrained(root / t.name, safe_serialization=True)
        tok.save_pretrained(root / t.name)
        entry = {"source": "local", "path": str(root / t.name), "chat": t.file is not None}
        if t.enable_thinking is not None:
            entry["enable_thinking"] = t.enable_thinking
        params = parse_params(
            {
                "model": t.name,
                "models": {t.name: entry},
                # sdpa is the runtime default; Gemma-2 has no sdpa kernel and must still load.
                "runtime": {"device": "cpu", "dtype": "float32", "attn_implementation": "sdpa"},
            }
        )
        loaded[t.name] = load_model(params)
    return loaded


def _expected_ids(tok, text: str) -> list[int]:
    ids = tok(text, add_special_tokens=False).input_ids
    bos = tok.bos_token_id
    if tok.bos_token is not None and getattr(tok, "add_bos_token", False):
        if not text.startswith(tok.bos_token):
            ids = [bos, *ids]
    return list(ids)


def _table(tok, enc, loss: list[int]) -> str:
    names: dict[int, list[str]] = {}
    for name in ("user_end", "pre_assistant", "last"):
        names.setdefault(enc.position(name), []).append(name)
    for k in range(1, enc.assistant_len + 1):
        names.setdefault(enc.position(f"assistant_{k}"), []).append(f"assistant_{k}")
    rows = [
        f"{i:4d} {tid:6d} {tok.convert_ids_to_tokens(tid)!r:28} {'loss' if loss[i] else '    '} "
        + ",".join(names.get(i, []))
        for i, tid in enumerate(enc.input_ids)
    ]
    return "\n".join(rows)


@pytest.mark.parametrize("t", TEMPLATE_CASES, ids=[t.name for t in TEMPLATE_CASES])
def test_positions_and_loss_match_the_hand_reading(template_models, t: Template):
    loaded = template_models[t.name]
    tok = loaded.tokenizer
    convs = conversations(t)
    encoded = []
    for kind, conv in convs.items():
        reading = t.read(conv)
        enc = encode_chat(tok, conv, chat=loaded.chat)
        print(f"\n== {t.name} / {kind}\n{_table(tok, enc, enc.loss_mask())}")
        # The prompt as generation sees it, then the rest as the model writes it after that.
        prompt_ids = _expected_ids(tok, reading.prompt)
        rest = tok(reading.lead + reading.answer + reading.end_of_turn, add_special_tokens=False)
        answer = tok(reading.answer + reading.end_of_turn, add_special_tokens=False)
        full_ids = prompt_ids + rest.input_ids
        if not reading.end_of_turn:
            full_ids.append(tok.eos_token_id)
        prompt_len = len(prompt_ids) + len(rest.input_ids) - len(answer.input_ids)
        assert enc.input_ids == full_ids, kind
        assert enc.prompt_len == prompt_len, kind
        assert enc.position("pre_assistant") == prompt_len - 1
        assert enc.position("prompt_last") == prompt_len - 1
        assert enc.position("user_end") == len(_expected_ids(tok, reading.through_user)) - 1
        # The loss covers the answer and exactly one end-of-turn token, nothing after it.
        loss_ids = [i for i, m in zip(enc.input_ids, enc.loss_mask(), strict=True) if m]
        eot = tok.convert_tokens_to_ids(reading.end_of_turn or tok.eos_token)
        assert loss_ids[-1] == eot and loss_ids.count(eot) == 1, kind
        assert enc.position("last") == len(full_ids) - 1
        first = tok.decode([enc.input_ids[enc.position("assistant_1")]])
        assert reading.answer.startswith(first.lstrip()), kind
        encoded.append((kind, enc, full_ids, prompt_len))
    _check_in_a_padded_batch(loaded, encoded)


def _check_in_a_padded_batch(loaded, encoded) -> None:
    """Activations read at the positions of a left-padded batch are the expected tokens' own."""
    tok = loaded.tokenizer
    batch = collate([e for _k, e, _f, _p in encoded], tok.pad_token_id, padding_side="left")
    with torch.no_grad():
        out = loaded.model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            labels=batch.labels,
            output_hidden_states=True,
        )
    pre = batch.positions("pre_assistant")
    with torch.no_grad(), record_layers(loaded.layers, [1]) as store:
        loaded.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    width = batch.input_ids.shape[1]
    nll, count = torch.zeros(()), 0
    logp = torch.log_softmax(out.logits.float(), dim=-1)
    for row, (kind, _enc, full_ids, prompt_len) in enumerate(encoded):
        pad = width - len(full_ids)
        assert pre[row].item() == pad + prompt_len - 1, kind
        assert torch.allclose(
            store[1][row, pre[row]], out.hidden_states[2][row, pad + prompt_len - 1]
        )
        for i in range(prompt_len, len(full_ids)):
            nll -= logp[row, pad + i - 1, full_ids[i]]
            count += 1
    # The model's own loss over the batch labels equals the loss over the expected answer tokens.
    assert torch.allclose(out.loss, nll / count, atol=1e-5)


def test_prompt_alone_ends_where_the_answer_starts(template_models):
    """A prompt's pre_assistant is the teacher-forced one when the thinking switch is off."""
    for name in ("smollm2", "qwen2.5", "qwen3", "mistral", "gemma2", "phi3.5", "plain"):
        loaded = template_models[name]
        conv = conversations(case(name))["system"]
        full = encode_chat(loaded.tokenizer, conv, chat=loaded.chat)
        prompt = encode_chat(loaded.tokenizer, conv[:-1], chat=loaded.chat)
        assert prompt.input_ids == full.input_ids[: full.prompt_len], name
        assert prompt.position("pre_assistant") == full.position("pre_assistant"), name


def test_qwen3_thinking_block_is_neither_answer_nor_loss(template_models):
    loaded = template_models["qwen3-thinking"]
    tok = loaded.tokenizer
    conv = conversations(case("qwen3-thinking"))["no-system"]
    enc = encode_chat(tok, conv, chat=True)
    pieces = tok.convert_ids_to_tokens(enc.input_ids)
    think = pieces.index("<think>")
    assert think < enc.prompt_len and pieces.index("</think>") < enc.prompt_len
    assert tok.decode(enc.input_ids[enc.prompt_len :]) == ANSWER + "<|im_end|>"
    # Without the switch the generation prompt stops before the block the answer follows.
    prompt = encode_chat(tok, conv[:-1], chat=True)
    assert tok.decode(prompt.input_ids).endswith("<|im_start|>assistant\n")


def test_enable_thinking_on_a_template_without_the_switch_is_refused(smol_dir, tmp_path):
    from llmlab.models import ModelLoadError, load_tokenizer

    dressed_tokenizer(smol_dir, case("smollm2")).save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    params = parse_params(
        {
            "model": "m",
            "models": {"m": {"source": "local", "path": str(tmp_path), "enable_thinking": False}},
        }
    )
    with pytest.raises(ModelLoadError, match=r"models\.m\.enable_thinking: .*no enable_thinking"):
        load_tokenizer(params.models["m"], "m", params.runtime)


def test_gemma2_loads_with_eager_attention_under_the_default_runtime(template_models, caplog):
    import logging

    from llmlab.models import attention_kernel
    from llmlab.params import Runtime

    assert template_models["gemma2"].model.config._attn_implementation == "eager"
    assert template_models["qwen2.5"].model.config._attn_implementation == "sdpa"
    where = template_models["gemma2"].model.config._name_or_path
    with caplog.at_level(logging.WARNING, logger="llmlab.models"):
        assert attention_kernel(where, "g", Runtime(attn_implementation="sdpa")) == "eager"
    assert "Gemma2ForCausalLM has no sdpa attention" in caplog.text
    assert "runtime.attn_implementation falls back to eager" in caplog.text


def test_a_template_that_repeats_the_content_is_refused(smol_dir):
    tok = dressed_tokenizer(smol_dir, case("smollm2"))
    tok.chat_template = (
        "{% for m in messages %}{{ m['content'] }}|{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}>{% endif %}"
    )
    with pytest.raises(ChatError, match="writes message 0 2 times"):
        encode_chat(tok, [{"role": "user", "content": "hi"}], chat=True)


def test_continuation_is_tokenised_alone_when_it_would_merge_into_the_prompt(smol_dir):
    # A generation prompt ending in a space: " Four" is one token, so the joint tokenisation
    # would swallow the prompt's last token; the prompt keeps the tokens generation sees.
    tok = dressed_tokenizer(smol_dir, case("smollm2"))
    tok.chat_template = (
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '<|im_end|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    )
    conv = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Four"}]
    enc = encode_chat(tok, conv, chat=True)
    prompt = encode_chat(tok, conv[:1], chat=True)
    assert enc.input_ids[: enc.prompt_len] == prompt.input_ids
    assert tok.decode(enc.input_ids[enc.prompt_len :]) == "Four<|im_end|>"


# Contents a text search confuses with the template: the text of the end-of-turn token that
# follows them (ChatML's <|im_end|>, Gemma's <end_of_turn>, Phi-3.5's <|end|>), and whitespace
# at the edges that trimming templates drop and role tokens absorb.
TRICKY_CONTENTS = ("end", "turn", "  The branch closes early.  \n")


@pytest.mark.parametrize("t", TEMPLATE_CASES, ids=[t.name for t in TEMPLATE_CASES])
def test_content_token_span_is_the_content_as_the_template_places_it(smol_dir, t: Template):
    from llmlab.chat import content_token_span

    tok = dressed_tokenizer(smol_dir, t)
    chat = t.file is not None
    for content in TRICKY_CONTENTS:
        conv = [{"role": "user", "content": content}, {"role": "assistant", "content": ANSWER}]
        ids = encode_chat(tok, conv, chat=chat).input_ids
        start, end = content_token_span(tok, conv, 0, chat=chat)
        # The hand reading ends the prompt text at the content's last non-space character.
        assert end == len(_expected_ids(tok, t.read(conv).through_user.rstrip())), content
        assert tok.decode(ids[start:end]).strip() == content.strip(), content
        assert not set(ids[start:end]) & set(tok.all_special_ids), content
        if "branch" in content:
            # Characters of the content as given, whatever the template trims.
            lo = content.index("branch")
            s2, e2 = content_token_span(tok, conv, 0, chat=chat, chars=(lo, len(content)))
            assert start < s2 < e2 == end
            assert tok.decode(ids[s2:e2]).strip() == "branch closes early."


@pytest.mark.parametrize("t", TEMPLATE_CASES, ids=[t.name for t in TEMPLATE_CASES])
def test_content_token_span_of_a_system_prompt_the_user_repeats(smol_dir, t: Template):
    from llmlab.chat import content_token_span

    tok = dressed_tokenizer(smol_dir, t)
    chat = t.file is not None
    user = f"{SYSTEM} {SYSTEM}"
    conv = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": user},
        {"role": "assistant", "content": ANSWER},
    ]
    ids = encode_chat(tok, conv, chat=chat).input_ids
    s_sys, e_sys = content_token_span(tok, conv, 0, chat=chat)
    s_user, e_user = content_token_span(tok, conv, 1, chat=chat)
    assert tok.decode(ids[s_sys:e_sys]).strip() == SYSTEM
    assert tok.decode(ids[s_user:e_user]).strip() == user
    # Every template writes the system text first (Gemma-2 folds it into the user turn).
    assert e_sys <= s_user
    assert e_user == len(_expected_ids(tok, t.read(conv).through_user.rstrip()))
    with pytest.raises(ChatError, match="message 2 is not part of the prompt"):
        content_token_span(tok, conv, 2, chat=chat)


# What each template writes after a message's content to end its turn, whitespace included.
TURN_ENDS = {
    "smollm2": "<|im_end|>\n",
    "qwen2.5": "<|im_end|>\n",
    "qwen3": "<|im_end|>\n",
    "qwen3-thinking": "<|im_end|>\n",
    "mistral": "</s>",
    "gemma2": "<end_of_turn>\n",
    "phi3.5": "<|end|>\n",
    "plain": "",
}


@pytest.mark.parametrize("t", TEMPLATE_CASES, ids=[t.name for t in TEMPLATE_CASES])
def test_turn_end_token_is_the_end_of_turn_of_a_reply_in_the_history(smol_dir, t: Template):
    from llmlab.chat import turn_end_token

    tok = dressed_tokenizer(smol_dir, t)
    chat = t.file is not None
    reply = "Blue, of course."
    conv = [
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": reply},
        {"role": "user", "content": QUESTION},
        {"role": "assistant", "content": ANSWER},
    ]
    prompt = t.read(conv).prompt
    through_reply = prompt[: prompt.index(reply) + len(reply)] + TURN_ENDS[t.name]
    assert prompt.startswith(through_reply)
    assert turn_end_token(tok, conv, 1, chat=chat) == len(_expected_ids(tok, through_reply))
