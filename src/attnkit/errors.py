"""Exceptions shared across attnkit's layers (no imports: any module may use them)."""

from __future__ import annotations


class NotApplicable(ValueError):
    """A setting that cannot run on this input (e.g. a KV budget, given as a share of the
    prompt, that falls below the tokens a policy always keeps). The benchmark records such
    a grid cell as not applicable instead of failing it."""
