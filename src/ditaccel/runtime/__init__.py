"""Executes a Plan on an unmodified diffusers transformer through hooks."""

import torch

from .apply import apply, remove, state_of

# Bumped when a change to the runtime changes how fast it executes a plan: speeds measured with an
# older runtime (benchmark rows, timed SODA calibrations) are then stale.  2: plain reuse no longer
# checked for NaN/Inf (a seventh of a FORA-4 run at DDPM, batch 4, fp32 on a CPU).  3: the NaN guard
# on forecast and partially recomputed outputs sums bf16 in bf16 (its fp32 sum of a bf16 tensor
# took about 4% of a FORA-3-with-forecasts run on the bundled model, bf16, batch 8; now about 1%);
# fp32 runs as in 2.  4: DiT blocks' conditioning (timestep and label embedding, adaLN) on the steps
# that reuse their attention is computed once per trajectory, batched (a reusing call of FORA-3 on
# the bundled model, bf16, batch 8: about a quarter less time); every dtype.  5: steps that reuse
# every module of every DiT / PixArt block are collapsed into one weighted sum (runtime.collapse);
# plans are looked up in Python lists, cached outputs no longer detached (an anchor call dispatches
# the plain model's ops); every dtype.
RUNTIME_REVISION = 5
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
