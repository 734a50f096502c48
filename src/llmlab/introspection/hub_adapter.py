"""Import a published LoRA adapter as a variant instead of training it (the plan's Model 0).

The plan's Model 0 is already trained and published; importing it lets the four new variants
be the only trainings. Only the safetensors weights and peft's adapter_config.json are fetched,
at the pinned revision; the adapter is then loaded onto the registry's base model through the
library's own adapter loading (`llmlab.models.load_model(adapter=...)`, which checks the
files first), scored on the variant's validation set, and written where a trained adapter would
be, with metadata saying where it came from.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from llmlab.adapters import (
    PEFT_CONFIG_FILE,
    WEIGHTS_FILE,
    AdapterError,
    check_safetensors,
    write_adapter_metadata,
)
from llmlab.io import read_json, staged_dir, write_json

ADAPTER_FILES = (PEFT_CONFIG_FILE, WEIGHTS_FILE)


def fetch_adapter_files(repo_id: str, revision: str, subfolder: str | None, dest: Path) -> str:
    """Copy the adapter's config and safetensors weights from the hub into `dest`.

    Returns the commit the files came from (the pin itself when it is a commit sha). A repo
    holding only pickled weights (adapter_model.bin) is refused: pickles can run code on load.
    """
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

    dest.mkdir(parents=True, exist_ok=True)
    where = f"{repo_id}@{revision}" + (f"/{subfolder}" if subfolder else "")
    commit = revision
    for name in ADAPTER_FILES:
        try:
            path = hf_hub_download(repo_id, name, subfolder=subfolder, revision=revision)
        except EntryNotFoundError:
            raise AdapterError(
                f"hub adapter {where}: has no {name} (only a safetensors adapter is imported)"
            ) from None
        except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as e:
            raise AdapterError(f"hub adapter {where}: cannot download {name}: {e}") from None
        parts = Path(path).parts
        # The hub cache stores a download under snapshots/<commit sha>/: the resolved commit.
        if "snapshots" in parts:
            commit = parts[parts.index("snapshots") + 1]
        shutil.copyfile(path, dest / name)
    check_safetensors(dest / WEIGHTS_FILE)
    return commit


def check_rank(dest: Path, rank: int, alpha: float, where: str) -> dict[str, Any]:
    """Return the adapter's peft config after checking its rank and alpha against the variant."""
    config = read_json(dest / PEFT_CONFIG_FILE)
    if not isinstance(config, dict):
        raise AdapterError(f"{where}: {PEFT_CONFIG_FILE} is not a JSON object")
    got = (config.get("r"), config.get("lora_alpha"))
    if got[0] != rank or got[1] is None or float(got[1]) != float(alpha):
        raise AdapterError(
            f"{where}: the published adapter has r={got[0]}, alpha={got[1]}; the variant "
            f"declares rank={rank}, alpha={alpha:g}"
        )
    return config


def check_base_model(peft_config: dict[str, Any], entry: Any, name: str, where: str) -> None:
    """Fail when a hub-sourced registry model is not the base the adapter was published for.

    peft records the base model's id (`base_model_name_or_path`); LoRA weights applied to
    another base load without complaint and give meaningless answers. A local or converted
    registry model has no hub id to compare, so only a hub source is checked.
    """
    published = peft_config.get("base_model_name_or_path")
    if entry.source != "hub" or not published:
        return
    if published.lower() != str(entry.repo_id).lower():
        raise AdapterError(
            f"{where}: published for base model {published!r}, but models.{name} is "
            f"{entry.repo_id!r}"
        )


def import_adapter(
    params: Any,
    variant_name: str,
    out_dir: Path,
    metadata: dict[str, Any],
    val_metrics: Any,
) -> dict[str, Any]:
    """Fetch, load, validate and write a published adapter as `variant_name`; return metadata.

    `val_metrics(loaded)` scores the loaded adapter on the variant's validation rows; its values
    form the one curve row of the written adapter (step None: no training ran here).
    """
    from llmlab.models import load_model

    cfg = params.section("introspection")
    variant = cfg.variants[variant_name]
    hub = variant.hub_adapter
    where = f"introspection.variants.{variant_name}.hub_adapter ({hub.repo_id}@{hub.revision})"
    out_dir = Path(out_dir)
    with staged_dir(out_dir) as staging:
        commit = fetch_adapter_files(hub.repo_id, hub.revision, hub.subfolder, staging)
        peft_config = check_rank(staging, variant.rank, variant.alpha, where)
        check_base_model(peft_config, params.models[params.model], params.model, where)
        meta = {
            # load_params(family="introspection") made params.model the family's model.
            "base_model": params.model,
            "imported_from": {
                "repo_id": hub.repo_id,
                "revision": hub.revision,
                "commit": commit,
                "subfolder": hub.subfolder,
                "published_base_model": peft_config.get("base_model_name_or_path"),
                "target_modules": peft_config.get("target_modules"),
            },
            "config": {"rank": variant.rank, "alpha": variant.alpha},
            "steps": 0,
            "n_examples": 0,
            "final_train_loss": None,
            "final_val_loss": None,
            **metadata,
        }
        write_adapter_metadata(staging, meta)
        # The library's loader: check_adapter (files, metadata, base model) then peft.
        loaded = load_model(params, adapter=staging)
        values = val_metrics(loaded)
        write_json(staging / "curve.json", [{"step": None, "source": "imported", **values}])
    return meta
