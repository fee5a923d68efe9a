"""Executes a Plan on an unmodified diffusers transformer through hooks."""

from .apply import apply, remove, state_of

# Bumped when a change to the runtime changes how fast it executes a plan: speeds measured with an
# older runtime (benchmark rows, timed SODA calibrations) are then stale.  2: plain reuse no longer
# checked for NaN/Inf (a seventh of a FORA-4 run at DDPM, batch 4, fp32 on a CPU)
RUNTIME_REVISION = 2

__all__ = ["RUNTIME_REVISION", "apply", "remove", "state_of"]
