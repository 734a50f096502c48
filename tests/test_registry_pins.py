"""Hub models in the registry are pinned to a commit, and the loader asks the hub for it.

A branch or tag (`main`, `v1`) moves under a run; an entry without a 40-hex commit sha is
refused in one line naming the entry. The tokenizer, the config read for the attention kernel
and the weights are all fetched at that commit (checked on a tiny local model standing in for
the hub repo: no network).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import transformers
import yaml

from llmlab.params import ParamsError, parse_params

ROOT = Path(__file__).resolve().parents[1]
SHA = "0123456789abcdef0123456789abcdef01234567"


def hub_params(revision: str | None) -> dict:
    entry = {"source": "hub", "repo_id": "org/tiny"}
    if revision is not None:
        entry["revision"] = revision
    return {
        "model": "tiny",
        "models": {"tiny": entry},
        # sdpa: the loader also reads the config to check the kernel, a third hub fetch.
        "runtime": {"device": "cpu", "dtype": "float32", "attn_implementation": "sdpa"},
    }


def test_every_hub_entry_of_the_project_is_pinned_to_a_commit() -> None:
    models = yaml.safe_load((ROOT / "params.yaml").read_text())["models"]
    hub = {name: e for name, e in models.items() if e["source"] == "hub"}
    assert len(hub) >= 9
    for name, entry in hub.items():
        assert re.fullmatch(r"[0-9a-f]{40}", entry.get("revision") or ""), name
    shas = [e["revision"] for e in hub.values()]
    assert len(set(shas)) == len(shas)  # one commit per repo, none copied across entries


@pytest.mark.parametrize("revision", [None, "main", "v1.0", "0e9e39f"])
def test_a_hub_entry_without_a_commit_is_refused_in_one_line(revision) -> None:
    with pytest.raises(ParamsError) as err:
        parse_params(hub_params(revision))
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("params.yaml: models.tiny: revision: a hub model is pinned")
    assert repr(revision) in message


def test_the_loader_fetches_every_hub_file_at_the_pinned_commit(tiny_dirs, monkeypatch) -> None:
    from llmlab.models import load_model

    local = str(tiny_dirs["llama"])
    calls: list[tuple[str, str, str | None]] = []

    def redirect(cls: type, kind: str) -> None:
        original = cls.from_pretrained.__func__

        def from_pretrained(klass, where, *args, **kwargs):
            calls.append((kind, where, kwargs.pop("revision", None)))
            return original(klass, local, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(from_pretrained))

    redirect(transformers.AutoTokenizer, "tokenizer")
    redirect(transformers.AutoConfig, "config")
    redirect(transformers.AutoModelForCausalLM, "weights")
    loaded = load_model(parse_params(hub_params(SHA)))
    assert loaded.name == "tiny" and loaded.n_layers > 0
    # transformers' own nested calls (the tokenizer reading its config) get the redirected
    # local directory; every call llmlab makes names the repo and the commit.
    ours = [c for c in calls if c[1] != local]
    assert {kind for kind, _, _ in ours} == {"tokenizer", "config", "weights"}
    assert all(where == "org/tiny" and rev == SHA for _, where, rev in ours), ours
