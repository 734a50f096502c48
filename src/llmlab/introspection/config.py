"""Typed params of the introspection family (the `introspection:` section of params.yaml)."""

from __future__ import annotations

from llmlab.params import StrictModel


class IntrospectionParams(StrictModel):
    """The introspection section; fields are added with the family's stages."""
