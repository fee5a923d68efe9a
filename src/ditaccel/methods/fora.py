"""FORA (Selvaraju et al. 2024, arXiv 2407.01425): compute every module in full every ``interval``
steps and reuse the cached attention and MLP outputs on the steps between."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..plan import FULL, REUSE, Plan, check_schedule


@dataclass(frozen=True)
class Config:
    interval: int = 3
    forecast: int = 0            # Plan.forecast: 0 reuse, 1 first-order forecast

    def __post_init__(self):
        check_schedule("FORA", self.interval, self.forecast)

    def tag(self) -> str:
        return ("f1-" if self.forecast else "") + f"fora-n{self.interval}"


def anchors_every(num_steps: int, interval: int) -> torch.Tensor:
    return torch.arange(num_steps) % interval == 0


def plan(config: Config, shape) -> Plan:
    anchors = anchors_every(shape.num_steps, config.interval)
    tokens = torch.full((shape.num_steps, shape.num_layers, len(shape.modules)), FULL)
    tokens[~anchors] = REUSE
    return Plan(num_tokens=shape.num_tokens, modules=shape.modules, anchors=anchors, tokens=tokens,
                forecast=config.forecast,
                method="fora", meta={"config": {"forecast": config.forecast, "interval": config.interval}})
