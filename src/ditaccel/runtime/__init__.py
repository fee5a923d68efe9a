"""Executes a Plan on an unmodified diffusers transformer through hooks."""

import torch

from .apply import apply, remove, state_of

# Bumped when a change to the runtime changes how fast it executes a plan: speeds measured with an
# older runtime (benchmark rows, timed SODA calibrations) are then stale.  What each revision
# changed is in CHANGELOG.md.
RUNTIME_REVISION = 12
# per dtype, the oldest revision whose timings are this one's
SAME_SPEED_SINCE: dict = {}


def same_speed(revision: int, dtype=None) -> bool:
    """Whether plans timed with runtime ``revision`` in ``dtype`` (a torch dtype or a name of
    ``registry.DTYPES``; None: unknown) run at this revision's speed: timings measured then are current."""
    from ..registry import DTYPES

    if revision == RUNTIME_REVISION:
        return True
    dtype = DTYPES.get(dtype) if isinstance(dtype, str) else dtype
    return dtype is not None and SAME_SPEED_SINCE.get(dtype, RUNTIME_REVISION) <= revision <= RUNTIME_REVISION


__all__ = ["RUNTIME_REVISION", "apply", "remove", "same_speed", "state_of"]
