"""Typed params of the preferences family (the `preferences:` section of params.yaml)."""

from __future__ import annotations

from llmlab.params import StrictModel


class PreferencesParams(StrictModel):
    """The preferences section; fields are added with the family's stages."""
