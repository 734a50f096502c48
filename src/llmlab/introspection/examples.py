"""Dataset rows read back and turned into training examples or steered evaluation rows."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llmlab.chat import Message
from llmlab.introspection.conversation import (
    RowSteer,
    answer_token_id,
    answer_tokens,
    label_choice_ids,
    reply_token_span,
    turn_token_span,
)
from llmlab.introspection.vectors import VectorBank
from llmlab.io import DataError, numbered, read_jsonl
from llmlab.models import LoadedModel
from llmlab.training import SteerSpec, TrainExample

Row = dict[str, Any]


def check_steer_field(path: Path | str, lineno: int, row: Row) -> None:
    """Fail with file:line when a row's steering contradicts its `steered` flag or has no size."""
    steer = row.get("steer")
    steered = row.get("steered")
    where = f"{path}:{lineno}"
    if steered and steer is None:
        raise DataError(f"{where}: steered is true but steer is null")
    if steer is None:
        return
    if steered is False:
        raise DataError(f"{where}: steered is false but a steer spec is given")
    for key in ("set", "index", "layer", "strength"):
        if key not in steer:
            raise DataError(f"{where}: steer.{key} missing")
    strength = steer["strength"]
    if not isinstance(strength, int | float) or strength <= 0:
        raise DataError(
            f"{where}: steer.strength must be > 0 for a steered example, got {strength!r}"
        )


def read_rows(path: Path | str, required: Sequence[str] = ("id",)) -> list[Row]:
    """Return the rows of a dataset or trial file, with every steer field checked."""
    rows = read_jsonl(path, required=required, id_field="id")
    for n, row in numbered(rows):
        check_steer_field(path, n, row)
    return rows


def row_steer(
    loaded: LoadedModel, bank: VectorBank, messages: Sequence[Message], steer: Row | None
) -> RowSteer | None:
    """Return the steering of one conversation (see `steer_spec` for the two modes).

    single_layer: the vector at `layer`, strength x the layer's residual norm, on the context
    turn's content (or one sentence of it). layer_range (the anchor's): the same vector at
    every layer of `layers`, strength as the absolute magnitude, on every token through the
    fixed reply (or one sentence of the context).
    """
    if steer is None:
        return None
    layer = int(steer["layer"])
    mode = steer.get("mode", "single_layer")
    layers = tuple(int(x) for x in steer["layers"]) if mode == "layer_range" else (layer,)
    bad = [x for x in (layer, *layers) if not 0 <= x < loaded.n_layers]
    if bad:
        raise DataError(
            f"steer.layer(s) {bad} out of range for {loaded.name} ({loaded.n_layers} layers)"
        )
    vector = bank.vector(steer["set"], int(steer["index"]), layer)
    chars = tuple(steer["chars"]) if steer.get("chars") is not None else None
    if mode == "layer_range":
        if list(layers) != list(range(layers[0], layers[-1] + 1)):
            raise DataError(f"steer.layers {list(layers)} is not a contiguous range")
        magnitude = float(steer["strength"])
        if chars is None:
            span = reply_token_span(loaded.tokenizer, messages, chat=loaded.chat)
        else:
            span = turn_token_span(loaded.tokenizer, messages, chat=loaded.chat, chars=chars)
    elif mode == "single_layer":
        magnitude = bank.magnitude(float(steer["strength"]), layer)
        span = turn_token_span(loaded.tokenizer, messages, chat=loaded.chat, turn=0, chars=chars)
    else:
        raise DataError(f"steer.mode {mode!r} unknown (single_layer, layer_range)")
    return RowSteer(vector, magnitude, layers, span)


def training_examples(
    loaded: LoadedModel,
    bank: VectorBank,
    rows: Sequence[Row],
    one_token: bool = True,
    context_gradient: bool = True,
) -> list[TrainExample]:
    """Return TrainExamples whose loss covers only the answer's tokens, end of turn excluded.

    one_token=True: a yes/no row. With an `answer_prefix` (the anchor's read-out) only the
    label token after the prefix is trained, scored against the other label's token alone
    (yes vs no, not against the vocabulary); with an empty prefix the answer is the bare label,
    one token, trained against the full vocabulary. one_token=False trains every answer token.
    context_gradient=False runs the context turn and the fixed reply without gradient (the
    anchor's KV cache filled under no_grad).
    Tokens after the answer are cut from the sequence: under causal attention they cannot
    change the answer's loss, and leaving them out keeps them out of the loss.
    """
    out = []
    for row in rows:
        messages = row["messages"]
        choices = None
        if one_token and row.get("answer_prefix"):
            choices = label_choice_ids(loaded, messages[:-1], row["answer_prefix"])
            n = len(answer_tokens(loaded, messages))
        elif one_token:
            answer_token_id(loaded, messages)  # ChatError when the label is not one token
            n = 1
        else:
            n = len(answer_tokens(loaded, messages))
        spec = row_steer(loaded, bank, messages, row.get("steer"))
        steer = None
        if spec is not None:
            steer = SteerSpec(spec.vector, spec.magnitude, spec.layers, spec.span)
        no_grad = None
        if not context_gradient:
            no_grad = reply_token_span(loaded.tokenizer, messages, chat=loaded.chat)[1]
        out.append(
            TrainExample(
                messages, steer=steer, loss_tokens=n, loss_choices=choices, no_grad_prefix=no_grad
            )
        )
    return out
