"""ToCa-style token-wise caching (Zou et al. 2024, arXiv 2410.05317), attention-free variant:
full compute every ``interval`` steps; on the steps between, every module recomputes a fixed
fraction ``ratio`` of its tokens (chosen at run time by ``token_score``) and reuses the rest.

ToCa ranks tokens with attention-map scores and tunes ratios per layer; we keep one ratio and an
attention-free score so fused attention kernels stay in use."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..plan import FULL, TOKEN_SCORES, Plan, check_schedule
from .fora import anchors_every


@dataclass(frozen=True)
class Config:
    interval: int = 3
    ratio: float = 0.1
    token_score: str = "delta"
    forecast: int = 0            # Plan.forecast: 0 reuse, 1 first-order forecast

    def __post_init__(self):
        check_schedule("ToCa", self.interval, self.forecast)
        if not 0 <= self.ratio < 1:
            raise ValueError(f"ToCa ratio is the fraction of tokens recomputed, in [0, 1); got {self.ratio}")
        if self.token_score not in TOKEN_SCORES:
            raise ValueError(f"unknown token score {self.token_score!r}; choose one of {TOKEN_SCORES}")

    def tag(self) -> str:
        return ("f1-" if self.forecast else "") + f"toca-n{self.interval}-r{self.ratio:g}-{self.token_score}"


def plan(config: Config, shape) -> Plan:
    anchors = anchors_every(shape.num_steps, config.interval)
    k = int(round(config.ratio * shape.num_tokens))
    k = min(max(k, 0), shape.num_tokens - 1)
    tokens = torch.full((shape.num_steps, shape.num_layers, len(shape.modules)), FULL)
    tokens[~anchors] = k
    return Plan(num_tokens=shape.num_tokens, modules=shape.modules, anchors=anchors, tokens=tokens,
                forecast=config.forecast,
                token_score=config.token_score, method="toca",
                meta={"config": {"forecast": config.forecast, "interval": config.interval, "ratio": config.ratio,
                                 "token_score": config.token_score}})
