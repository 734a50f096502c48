"""Typed params of the persona family (the `persona:` section of params.yaml)."""

from __future__ import annotations

from llmlab.params import StrictModel


class PersonaParams(StrictModel):
    """The persona section; fields are added with the family's stages."""
