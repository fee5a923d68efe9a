"""Executes a Plan on an unmodified diffusers transformer through hooks."""

from .apply import apply, remove, state_of

__all__ = ["apply", "remove", "state_of"]
