"""Planners: pure functions from a method's config and the model's shape to a Plan.

Each method file has the same parts: a frozen, self-validating ``Config`` and ``plan(config,
shape) -> Plan``.  ``METHODS`` maps CLI names to them.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import delta_dit, fora, toca


@dataclass(frozen=True)
class ModelShape:
    """What a planner needs to know about the model and the sampler."""
    num_steps: int
    num_layers: int
    num_tokens: int
    modules: tuple[str, ...] = ("attn", "mlp")


METHODS = {"fora": fora, "toca": toca, "delta-dit": delta_dit}
