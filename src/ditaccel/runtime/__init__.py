"""Executes a Plan on an unmodified diffusers transformer through hooks (work in progress: not
exported from ``ditaccel`` until every architecture of issue 3 is covered)."""

from .apply import apply, remove, state_of

__all__ = ["apply", "remove", "state_of"]
