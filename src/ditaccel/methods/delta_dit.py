"""Δ-DiT-style block-range caching (Chen et al. 2024, arXiv 2406.01125): between anchors (every
``interval`` steps) reuse the modules of a range of blocks and compute the others.  Δ-DiT's
finding: the rear blocks shape the outline early in sampling and the front blocks the details
late, so in the first ``boundary`` fraction of steps the *front* blocks are cached (the rear ones
keep computing) and afterwards the *rear* blocks.  Δ-DiT caches the blocks' residual deviation;
here the modules' outputs are cached (same compute saved, current gates kept)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..plan import FULL, REUSE, Plan, check_schedule
from .fora import anchors_every


@dataclass(frozen=True)
class Config:
    interval: int = 2
    cached_blocks: float = 0.5   # fraction of blocks reused between anchors
    boundary: float = 0.5        # fraction of the steps that count as the early stage
    forecast: int = 0            # Plan.forecast: 0 reuse, 1 first-order forecast

    def __post_init__(self):
        check_schedule("Δ-DiT", self.interval, self.forecast)
        if not 0 < self.cached_blocks <= 1:
            raise ValueError(f"cached_blocks is a fraction in (0, 1], got {self.cached_blocks}")
        if not 0 <= self.boundary <= 1:
            raise ValueError(f"boundary is a fraction of the steps in [0, 1], got {self.boundary}")

    def tag(self) -> str:
        return ("f1-" if self.forecast else "") + f"delta-dit-n{self.interval}-c{self.cached_blocks:g}-b{self.boundary:g}"


def plan(config: Config, shape) -> Plan:
    t_n, l_n = shape.num_steps, shape.num_layers
    anchors = anchors_every(t_n, config.interval)
    n_cached = max(1, round(config.cached_blocks * l_n))
    early = torch.arange(t_n) < round(config.boundary * t_n)
    tokens = torch.full((t_n, l_n, len(shape.modules)), FULL)
    for t in range(t_n):
        if anchors[t]:
            continue
        layers = range(n_cached) if early[t] else range(l_n - n_cached, l_n)
        tokens[t, list(layers)] = REUSE
    return Plan(num_tokens=shape.num_tokens, modules=shape.modules, anchors=anchors, tokens=tokens,
                forecast=config.forecast,
                method="delta-dit",
                meta={"config": {"forecast": config.forecast, "interval": config.interval, "cached_blocks": config.cached_blocks,
                                 "boundary": config.boundary}})
