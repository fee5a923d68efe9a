"""Per-generation state of an applied plan: which step and CFG branch is running, the module caches,
and the record of what was computed.  Reset at the start of every new sampling trajectory."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from ..plan import FULL, Plan


class PlanMismatch(ValueError):
    pass


@dataclass
class ModuleCache:
    out: torch.Tensor  # (B, N, D) the module's output as last computed or patched
    ref: torch.Tensor  # (B, N, D) the module's input when each token was last computed


@dataclass
class CallRecord:
    step: int
    branch: int
    anchor: bool
    # (layer, role) -> tokens computed (N for full, 0 for reuse)
    computed: dict[tuple[int, str], int] = field(default_factory=dict)
    rows: int = 0
    wall_s: float = 0.0
    flops: int | None = None  # counted only when RunState.count_flops is on


class RunState:
    """Step index and CFG branch come from the timestep the transformer is called with: sampling
    timesteps strictly decrease along a trajectory, so a larger one starts a new trajectory (and
    clears every cache), a smaller one is the next step, an equal one is another guidance branch
    of the same step (pipelines that call the transformer once per branch)."""

    def __init__(self, plan: Plan, expected_steps: Callable[[], int | None] = lambda: None):
        self.plan = plan
        self.expected_steps = expected_steps
        self.count_flops = False
        self.reset()

    def reset(self) -> None:
        self.step, self.branch, self.last_t = -1, 0, None
        self.caches: dict[tuple[int, int, str], ModuleCache] = {}
        self.records: list[CallRecord] = []

    def begin_call(self, timestep, rows: int) -> CallRecord:
        t = float(timestep.reshape(-1)[0]) if torch.is_tensor(timestep) else float(timestep)
        if self.last_t is None or t > self.last_t:
            self.reset()
            self.step = 0
            expected = self.expected_steps()
            if expected is not None and expected != self.plan.num_steps:
                raise PlanMismatch(f"the plan is for {self.plan.num_steps} sampling steps but the "
                                   f"scheduler runs {expected}; make the plan for {expected} steps "
                                   f"or sample with {self.plan.num_steps}")
        elif t < self.last_t:
            self.step += 1
            self.branch = 0
            if self.step >= self.plan.num_steps:
                raise PlanMismatch(f"the sampler ran more than the plan's {self.plan.num_steps} "
                                   "steps; make the plan for the step count you sample with")
        else:
            self.branch += 1
        self.last_t = t
        record = CallRecord(self.step, self.branch, self.is_anchor, rows=rows)
        self.records.append(record)
        return record

    @property
    def is_anchor(self) -> bool:
        return bool(self.plan.anchors[self.step])

    def tokens_for(self, layer: int, module_index: int) -> int:
        return FULL if self.is_anchor else int(self.plan.tokens[self.step, layer, module_index])
