"""Activation capture checked against output_hidden_states; streaming, resume and errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llmlab.activations import (
    CaptureItem,
    capture_batch,
    capture_to_disk,
    load_activations,
    read_index,
)
from llmlab.chat import collate, encode_chat
from llmlab.io import DataError

CONVS = [
    [{"role": "user", "content": "Hi."}],
    [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "Tell me about the sea and its tides."},
    ],
    [
        {"role": "user", "content": "What is 17 times 3?"},
        {"role": "assistant", "content": "It is 51."},
    ],
]


def _reference(loaded, conv, layer, position):
    enc = encode_chat(loaded.tokenizer, conv, chat=loaded.chat)
    with torch.no_grad():
        out = loaded.model(torch.tensor([enc.input_ids]), output_hidden_states=True)
    return out.hidden_states[layer + 1][0, enc.position(position)]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_capture_matches_output_hidden_states(tiny_models, arch, side):
    loaded = tiny_models[arch]
    enc = [encode_chat(loaded.tokenizer, c, chat=True) for c in CONVS]
    batch = collate(enc, loaded.tokenizer.pad_token_id, padding_side=side)
    layers = [0, 1]  # the last layer's hidden_states entry includes the final norm
    got = capture_batch(loaded, batch, layers, ["prompt_last", "user_end"])
    for row, conv in enumerate(CONVS):
        for layer in layers:
            for pos in ("prompt_last", "user_end"):
                ref = _reference(loaded, conv, layer, pos)
                torch.testing.assert_close(got[(layer, pos)][row], ref, atol=1e-4, rtol=1e-4)


def test_capture_stops_after_last_needed_layer(tiny_models):
    loaded = tiny_models["llama"]
    ran = []
    handles = [
        layer.register_forward_hook(lambda m, i, o, k=k: ran.append(k))
        for k, layer in enumerate(loaded.layers)
    ]
    try:
        enc = [encode_chat(loaded.tokenizer, CONVS[0], chat=True)]
        capture_batch(loaded, collate(enc, 0), [1], ["last"])
    finally:
        for h in handles:
            h.remove()
    assert ran == [0, 1]


def _items(n):
    return [
        CaptureItem(
            f"item-{i}", [{"role": "user", "content": f"Question number {i}: " + "word " * (i % 7)}]
        )
        for i in range(n)
    ]


def test_capture_to_disk_streams_one_file_per_layer(tiny_models, tmp_path):
    loaded = tiny_models["qwen2"]
    items = _items(23)
    out = capture_to_disk(loaded, items, [0, 1], tmp_path / "acts", batch_size=4, progress=False)
    index = read_index(out)
    assert index["ids"] == [it.id for it in items]
    assert sorted(p.name for p in out.iterdir()) == ["index.json", "layer_000.npy", "layer_001.npy"]
    acts = load_activations(out, 1)
    assert acts.values.shape == (23, loaded.hidden_size)
    ref = _reference(loaded, items[5].messages, 1, "prompt_last").numpy()
    np.testing.assert_allclose(acts.select(["item-5"])[0], ref, atol=1e-4, rtol=1e-4)
    with pytest.raises(DataError, match="lacks 1 id"):
        acts.select(["item-5", "nope"])
    with pytest.raises(DataError, match="layer 2 not captured"):
        load_activations(out, 2)


def test_resume_after_interruption_gives_identical_files(tiny_models, tmp_path, monkeypatch):
    loaded = tiny_models["llama"]
    items = _items(30)
    full = capture_to_disk(loaded, items, [1], tmp_path / "full", batch_size=4, progress=False)

    import llmlab.activations as acts_mod

    calls = {"n": 0}
    real = acts_mod.capture_batch

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(acts_mod, "capture_batch", flaky)
    with pytest.raises(KeyboardInterrupt):
        capture_to_disk(
            loaded, items, [1], tmp_path / "resumed", batch_size=4, save_every=2, progress=False
        )
    assert not (tmp_path / "resumed").exists()  # nothing half-written at the final path
    assert (tmp_path / "resumed.partial").exists()
    done = np.load(tmp_path / "resumed.partial" / "progress.npy")
    assert 0 < done.sum() < len(items)
    monkeypatch.setattr(acts_mod, "capture_batch", real)
    calls["n"] = 0
    counting = {"rows": 0}

    def count(*args, **kwargs):
        counting["rows"] += args[1].input_ids.shape[0]
        return real(*args, **kwargs)

    monkeypatch.setattr(acts_mod, "capture_batch", count)
    out = capture_to_disk(
        loaded, items, [1], tmp_path / "resumed", batch_size=4, save_every=2, progress=False
    )
    assert counting["rows"] == len(items) - int(done.sum())  # only the rest was recomputed
    np.testing.assert_allclose(
        load_activations(out, 1).values, load_activations(full, 1).values, atol=1e-5
    )


def test_resume_drops_temporary_files_of_a_killed_run(tiny_models, tmp_path):
    """A run killed inside an atomic write leaves its temporary file in the work directory
    (seen in a SIGKILL test: `.index.json.<random>.json` reached the output); the resuming run
    must finish with exactly index.json and the layer files."""
    loaded = tiny_models["llama"]
    items = _items(6)
    full = capture_to_disk(loaded, items, [0, 1], tmp_path / "full", progress=False)
    work = tmp_path / "acts.partial"
    # the state after a kill between index.json's rename and the final rename, with the dead
    # run's temporaries beside it
    capture_to_disk(loaded, items, [0, 1], tmp_path / "acts", progress=False).rename(work)
    (work / ".index.json.b_8t9n9h.json").write_text("{")
    np.save(work / "progress.tmp.npy", np.ones(len(items), dtype=bool))
    (work / ".stray").mkdir()
    out = capture_to_disk(loaded, items, [0, 1], tmp_path / "acts", progress=False)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in full.iterdir())
    assert not work.exists()
    np.testing.assert_array_equal(load_activations(out, 1).values, load_activations(full, 1).values)


def test_duplicate_ids_and_shape_mismatch_are_refused(tiny_models, tmp_path):
    loaded = tiny_models["llama"]
    items = _items(3) + [_items(1)[0]]
    with pytest.raises(DataError, match="duplicate item id 'item-0'"):
        capture_to_disk(loaded, items, [0], tmp_path / "dup", progress=False)
    out = capture_to_disk(loaded, _items(4), [0], tmp_path / "ok", progress=False)
    np.save(out / "layer_000.npy", np.zeros((3, loaded.hidden_size), dtype=np.float32))
    with pytest.raises(DataError, match="does not match index"):
        load_activations(out, 0)
