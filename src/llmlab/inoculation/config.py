"""Typed params of the inoculation family (the `inoculation:` section of params.yaml)."""

from __future__ import annotations

from llmlab.params import StrictModel


class InoculationParams(StrictModel):
    """The inoculation section; fields are added with the family's stages."""
