"""Tiny random models of real architectures, with chat templates of the real model families.

The tokenizer is the embedded SmolLM2 tokenizer with the special tokens each template needs
added; the templates below reproduce the serialisation formats of Llama-3, Qwen2 (ChatML with a
default system turn) and Gemma (system text folded into the first user turn).
"""

from __future__ import annotations

from pathlib import Path

import torch

LLAMA3_TEMPLATE = (
    "{{ '<|begin_of_text|>' }}{% for m in messages %}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] | trim"
    " + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
QWEN2_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
GEMMA_TEMPLATE = (
    "{{ '<bos>' }}{% set sys = '' %}{% if messages[0]['role'] == 'system' %}"
    "{% set sys = messages[0]['content'] + '\n\n' %}{% set msgs = messages[1:] %}"
    "{% else %}{% set msgs = messages %}{% endif %}"
    "{% for m in msgs %}{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + (sys if loop.first else '') + m['content'] | trim"
    " + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)

ARCHS = {
    "llama": (
        LLAMA3_TEMPLATE,
        ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        "<|eot_id|>",
        "<|begin_of_text|>",
    ),
    "qwen2": (QWEN2_TEMPLATE, [], "<|im_end|>", None),
    "gemma3": (
        GEMMA_TEMPLATE,
        ["<bos>", "<start_of_turn>", "<end_of_turn>"],
        "<end_of_turn>",
        "<bos>",
    ),
}


def tiny_tokenizer(base_dir: Path, arch: str):
    """Return the embedded tokenizer dressed with `arch`'s chat template and special tokens."""
    from transformers import AutoTokenizer

    template, specials, eos, bos = ARCHS[arch]
    tok = AutoTokenizer.from_pretrained(base_dir)
    if specials:
        tok.add_special_tokens({"additional_special_tokens": specials})
    tok.chat_template = template
    tok.eos_token = eos
    if bos is not None:
        # Like the real Llama-3 and Gemma tokenizers: BOS is added on plain encoding, so the
        # templates (which write BOS themselves) exercise the no-double-BOS rule.
        tok.bos_token = bos
        tok.add_bos_token = True
    tok.pad_token = tok.eos_token
    return tok


def build_tiny_model(out_dir: Path, arch: str, base_tokenizer_dir: Path, seed: int = 0) -> Path:
    """Write a tiny random model of `arch` with its tokenizer to out_dir; returns out_dir."""
    from transformers import (
        AutoModelForCausalLM,
        Gemma3TextConfig,
        LlamaConfig,
        Qwen2Config,
    )

    tok = tiny_tokenizer(base_tokenizer_dir, arch)
    common = dict(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
        tie_word_embeddings=True,
    )
    if arch == "llama":
        cfg = LlamaConfig(**common)
    elif arch == "qwen2":
        cfg = Qwen2Config(**common)
    else:
        cfg = Gemma3TextConfig(**common, head_dim=16, sliding_window=64)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    return out_dir


def sharp_tiny_llama(tiny_models):
    """Return the tiny Llama LoadedModel with larger random weights (std 0.1), whose greedy
    tokens vary between prompts; same tokenizer and config otherwise."""
    import copy
    import dataclasses

    from transformers import AutoModelForCausalLM

    loaded = tiny_models["llama"]
    cfg = copy.deepcopy(loaded.model.config)
    cfg.initializer_range = 0.1
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    return dataclasses.replace(loaded, model=model)


def long_tail_prompts() -> list[list[dict[str, str]]]:
    """Eight one-turn conversations of 1 to 280 words: a long-tailed batch of prompt lengths."""
    words = "tea history of Europe ships trade ports".split()
    return [
        [{"role": "user", "content": " ".join(words[j % len(words)] for j in range(n))}]
        for n in (1, 280, 12, 150, 3, 60, 220, 30)
    ]
