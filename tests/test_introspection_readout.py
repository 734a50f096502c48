"""The anchor's read-out: "The answer is" + the label, trained and read yes against no.

Also the success items' gate on a model that leaks its yes/no format into free text.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import make_params

from llmlab.introspection.conversation import (
    detection_messages,
    label_choice_ids,
    prefixed_prompt,
)
from llmlab.introspection.examples import training_examples
from llmlab.introspection.sampling import flip_labels, to_training_rows
from llmlab.introspection.scoring import choice_scores, yes_no_choices
from llmlab.introspection.success import success_list
from llmlab.models import load_model
from llmlab.training import (
    LoraCollator,
    LoraTrainConfig,
    TrainExample,
    TrainingError,
    forced_choice_nll,
    prepare_examples,
    train_lora,
)

PREFIX = "The answer is"
QUESTION = "Do you detect any unusual modifications to your internal activations?"


def _trials(n: int = 4) -> list[dict]:
    return [
        {
            "id": f"t_{i:05d}",
            "context_id": f"c{i}",
            # The label is readable from the text, so a few steps can learn it.
            "context": f"Context number {i} talks about {'rivers' if i % 2 == 0 else 'stones'}.",
            "steered": i % 2 == 0,
            "steer": None,
            "question_index": i,
        }
        for i in range(n)
    ]


def test_forced_choice_loss_ignores_the_rest_of_the_vocabulary():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 11, generator=gen)
    labels = torch.full((2, 5), -100)
    labels[0, 4], labels[1, 3] = 7, 2  # row 0 says choice 7, row 1 says choice 2
    choices = torch.tensor([[7, 2], [7, 2]])
    got = forced_choice_nll(logits, labels, choices)
    # The label at column t is predicted by the logits at column t - 1.
    want = F.cross_entropy(logits[0, 3, [7, 2]][None], torch.tensor([0]), reduction="sum")
    want = want + F.cross_entropy(logits[1, 2, [7, 2]][None], torch.tensor([1]), reduction="sum")
    assert float(got) == pytest.approx(float(want), rel=1e-6)
    # Raising every non-choice logit changes nothing: yes is scored against no only.
    bumped = logits.clone()
    other = torch.ones(11, dtype=torch.bool)
    other[[7, 2]] = False
    bumped[:, :, other] += 5.0
    assert float(forced_choice_nll(bumped, labels, choices)) == pytest.approx(float(got), rel=1e-6)
    # The full-vocabulary loss would have changed.
    assert F.cross_entropy(bumped[0, 3][None], torch.tensor([7])) > F.cross_entropy(
        logits[0, 3][None], torch.tensor([7])
    )


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_training_rows_label_only_the_token_after_the_prefix(tiny_models, arch):
    loaded = tiny_models[arch]
    rows = to_training_rows(_trials(), [QUESTION], "Thank you.", "original", "train", PREFIX)
    assert rows[0]["messages"][-1]["content"] == "The answer is yes"
    assert rows[1]["messages"][-1]["content"] == "The answer is no"
    examples = training_examples(loaded, None, rows)
    yes_id, no_id = label_choice_ids(loaded, rows[0]["messages"][:-1], PREFIX)
    assert loaded.tokenizer.decode([yes_id]).strip() == "yes"
    assert loaded.tokenizer.decode([no_id]).strip() == "no"
    data = prepare_examples(loaded, examples, 256)
    batch = LoraCollator(loaded.tokenizer.pad_token_id, loaded.hidden_size)(data.features)
    assert batch["choice_ids"].tolist() == [[yes_id, no_id]] * len(rows)
    for row, labels, ex in zip(rows, batch["labels"], examples, strict=True):
        labelled = [int(t) for t in labels if t != -100]
        assert labelled == [yes_id if row["label"] == "yes" else no_id]
        # The prefix is in the sequence, before the labelled token, and carries no loss.
        enc = prefixed_prompt(loaded, row["messages"][:-1], PREFIX)
        n = len(enc.input_ids)
        assert ex.loss_choices == (yes_id, no_id)
        assert loaded.tokenizer.decode(enc.input_ids[enc.prompt_len :]).strip() == PREFIX
        assert int((labels[:n] != -100).sum()) == 0 and int(labels[n]) == labelled[0]


def test_flipped_rows_keep_the_prefix():
    rows = to_training_rows(_trials(8), [QUESTION], "Thank you.", "flipped", "train", PREFIX)
    flipped = [r for r in flip_labels(rows, 0.5, 0) if r["label_flipped"]]
    assert flipped
    for r in flipped:
        assert r["messages"][-1]["content"] == f"{PREFIX} {r['label']}"


def test_readout_reads_after_the_prefix_and_bare_mode_reads_the_first_token(tiny_models):
    loaded = tiny_models["llama"]
    prompt = detection_messages("Rivers run to the sea.", "Thank you.", QUESTION)
    with_prefix = prefixed_prompt(loaded, prompt, PREFIX)
    bare = prefixed_prompt(loaded, prompt, "")
    assert with_prefix.input_ids[: len(bare.input_ids)] == bare.input_ids
    assert loaded.tokenizer.decode(with_prefix.input_ids[len(bare.input_ids) :]).strip() == PREFIX
    choices = [yes_no_choices(loaded)]
    got = choice_scores(loaded, [prompt], choices, prefix=PREFIX)
    ids = torch.tensor([with_prefix.input_ids])
    with torch.no_grad():
        logp = torch.log_softmax(loaded.model(input_ids=ids).logits[0, -1].float(), dim=-1)
    want_yes = float(torch.logsumexp(logp[choices[0][0]], dim=0))
    assert got.logprobs[0][0] == pytest.approx(want_yes, abs=1e-5)
    assert 0 < got.normalised(0)[0] < 1


@pytest.mark.parametrize("packing", [True, False])
def test_forced_choice_examples_train(tiny_dirs, tmp_path, monkeypatch, packing):
    monkeypatch.chdir(tmp_path)
    torch.set_num_threads(1)
    loaded = load_model(make_params(tiny_dirs["llama"]))
    rows = to_training_rows(_trials(8), [QUESTION], "Thank you.", "original", "train", PREFIX)
    examples = training_examples(loaded, None, rows)
    cfg = LoraTrainConfig(
        rank=4, dropout=0.0, lr=5e-3, epochs=None, max_steps=16, per_device_batch_size=4,
        effective_batch_size=4, log_every=4, eval_every=100, packing=packing,
        lr_scheduler="constant_with_warmup",
    )  # fmt: skip
    res = train_lora(loaded, examples, cfg, Path("adapter"))
    losses = [r["loss"] for r in res.curve if r.get("loss") is not None]
    # A two-way loss starts near ln 2 (the full-vocabulary loss of a random model is ~ln V).
    assert abs(losses[0] - np.log(2)) < 0.3
    assert losses[-1] < losses[0]


def test_labelled_token_must_be_a_choice(tiny_models):
    loaded = tiny_models["llama"]
    msgs = detection_messages("Rivers.", "Thank you.", QUESTION, "The answer is yes")
    ex = TrainExample(msgs, loss_tokens=4, loss_choices=(1, 2))
    with pytest.raises(TrainingError, match="not among loss_choices"):
        prepare_examples(loaded, [ex], 256)


def _ci(v: float) -> dict[str, float]:
    return {"value": v, "lo": v - 0.05, "hi": v + 0.05}


def _metrics(leak: dict[str, float]) -> dict:
    b7 = {q: {"accuracy": _ci(0.6), "chance": 0.33} for q in ("layer_third", "strength")}
    return {
        "b1_detection": {},
        "b2_p_yes": {
            "food_control": {"self_shift_vs_base": _ci(0.0)},
            "original": {"self_shift_vs_base": _ci(0.2)},
            "key_comparisons": {"vague_minus_original_self": _ci(0.0)},
        },
        "b5_calibration": {
            "original": {"kl_minus_base": _ci(-0.5), "n_unparseable": 0, "n_prompts": 5},
            "base": {"n_unparseable": 0, "n_prompts": 5},
        },
        "b7_localization": {"original": {**b7, "any_signal": True}},
        "training": {"flipped_labels": {"val_accuracy_end": _ci(0.5), "final_train_loss": 0.69}},
        "b3_yes_no_intrusion": {m: {"only_yes_no": _ci(v)} for m, v in leak.items()},
    }


def test_success_items_are_not_judged_for_a_leaking_model():
    clean = {m: 0.0 for m in ("base", "original", "vague", "food_control", "flipped_labels")}
    judged = success_list(_metrics(clean), max_leak_rate=0.2)
    assert [s["met"] for s in judged] == [True, True, None, True, True, True]
    leaking = success_list(_metrics({**clean, "original": 0.5}), max_leak_rate=0.2)
    # Items reading model 0's free-text or yes/no behaviour are withheld; the others stand.
    assert [s["met"] for s in leaking] == [True, None, None, True, None, None]
    assert "original: 0.50 of B3 answers are only yes/no words" in leaking[1]["evidence"]
    food = success_list(_metrics({**clean, "food_control": 0.3}), max_leak_rate=0.2)
    assert food[0]["met"] is None and food[1]["met"] is True


def test_b2_records_read_absolute_and_renormalised_p_yes(tiny_models):
    from llmlab.introspection.eval_logprobs import load_behavioural, p_yes_records, p_yes_summary

    root = Path(__file__).resolve().parents[1]
    questions = load_behavioural(root / "data/introspection/behavioural_questions.jsonl")
    records = p_yes_records(tiny_models["qwen2"], questions[:4] + questions[-4:], 8)
    for r in records:
        assert r["p_yes_absolute"] + r["p_no_absolute"] == pytest.approx(r["choice_mass"])
        assert r["p_yes"] == pytest.approx(r["p_yes_absolute"] / r["choice_mass"])
        assert 0 < r["p_yes_absolute"] < r["p_yes"] < 1  # a random model spreads its mass
    s = p_yes_summary(records, seed=0)
    assert s["self_referential_p_yes"]["n_groups"] == 4 and s["control_p_yes"]["n_groups"] == 4


def test_detection_trials_read_after_the_prefix_with_layer_range_steering(tiny_models):
    from llmlab.introspection.eval_detection import detection_summary, yes_no_trials
    from llmlab.introspection.vectors import VectorBank
    from llmlab.steering import unit

    loaded = tiny_models["llama"]
    bank = VectorBank(
        random=unit(torch.randn(2, loaded.hidden_size, generator=torch.Generator().manual_seed(0))),
        concept=unit(torch.randn(1, loaded.n_layers, loaded.hidden_size)),
        residual_norm=torch.ones(loaded.n_layers),
        meta={"concept_layers": list(range(loaded.n_layers))},
    )
    steer = {"set": "random", "index": 0, "mode": "layer_range", "layers": [0, 1], "layer": 1}
    trials = [
        {"id": f"t{i}", "context": "Rivers run to the sea.", "steered": i % 2 == 0,
         "steer": {**steer, "strength": 30.0} if i % 2 == 0 else None}
        for i in range(4)
    ]  # fmt: skip
    records = yes_no_trials(loaded, bank, trials, [QUESTION], "Thank you.", 4, PREFIX)
    bare = yes_no_trials(loaded, bank, trials, [QUESTION], "Thank you.", 4, "")
    assert [r["p_yes"] for r in records] != pytest.approx([r["p_yes"] for r in bare])
    # Steering changes the read-out; the unsteered trials are identical to each other.
    assert records[0]["p_yes"] != pytest.approx(records[1]["p_yes"])
    assert records[1]["p_yes"] == pytest.approx(records[3]["p_yes"])
    summary = detection_summary(records)
    assert summary["n"] == 4 and "lo" in summary["d_prime"]
