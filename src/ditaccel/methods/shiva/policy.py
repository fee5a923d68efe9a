"""Shiva's adaptive keep-ratio policy and budget (Shiva-DiT, section 3).

``logit r(t, l) = Phi_time(MLP(t_emb)) + Phi_layer(e_l) + b_anchor`` with ``b_anchor`` starting
at ``logit(target)`` (the other terms start at zero, so the policy starts at the target
everywhere).  It depends on (timestep, layer) only: for inference it is compiled into a table of
token counts per (step, layer) (:func:`keep_counts`), the plan's ``route``, so shapes are static and
the same for every prompt.  The first block is never routed.

Budget: :class:`Budget` keeps an EMA of the batch-mean ratio, ``mu <- beta r_bar + (1 - beta) mu``,
and gives ``L_budget = r_bar * stopgrad(2 (mu - target) + lambda)``, whose gradient pushes the mean
ratio toward the target with the EMA's memory (the paper's loss).  ``lambda`` is an integral term,
``lambda <- lambda + gain (mu - target)`` every step (dual ascent on the constraint mean = target):
the paper's term alone balances the diffusion loss's pull toward more tokens at an EMA off the
target, the integral grows until the EMA sits on it.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ...plan import FULL, Plan, full_plan
from .router import timestep_embedding


class RatioPolicy(nn.Module):
    """Keep ratio per (timestep, layer); layer 0 is always 1 (never routed)."""

    def __init__(self, num_layers: int, target: float, t_dim: int = 128, hidden: int = 64):
        super().__init__()
        if not 0 < target < 1:
            raise ValueError(f"the target keep ratio must be in (0, 1), got {target}")
        if num_layers < 2:
            raise ValueError("Shiva routes blocks after the first: the model needs at least 2 blocks")
        self.num_layers, self.target, self.t_dim = num_layers, float(target), t_dim
        self.time = nn.Sequential(nn.Linear(t_dim, hidden), nn.SiLU(), nn.Linear(hidden, num_layers - 1))
        self.layer = nn.Parameter(torch.zeros(num_layers - 1))
        self.anchor = nn.Parameter(torch.tensor(math.log(target / (1 - target))))
        nn.init.zeros_(self.time[-1].weight)
        nn.init.zeros_(self.time[-1].bias)

    def logits(self, timesteps: torch.Tensor) -> torch.Tensor:
        """(B, L - 1) logits of the routed layers' keep ratios at timesteps (B,) in [0, 1000]."""
        emb = timestep_embedding(timesteps.reshape(-1), self.t_dim).to(self.anchor.dtype)
        return self.time(emb) + self.layer + self.anchor

    def forward(self, timesteps: torch.Tensor, noise_std: float = 0.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, L) keep ratios (column 0: 1); ``noise_std``: logit noise (policy learning only)."""
        z = self.logits(timesteps)
        if noise_std > 0:
            # drawn on the CPU: the same noise on every device for a seed
            z = z + noise_std * torch.randn(z.shape, generator=generator, dtype=z.dtype).to(z.device)
        r = torch.sigmoid(z)
        return torch.cat([torch.ones_like(r[:, :1]), r], dim=1)


def round_counts(ratios: torch.Tensor, num_tokens: int, multiple: int = 8) -> torch.Tensor:
    """``N r`` rounded to a multiple of ``multiple``, in [multiple, N] (no gradient): the token
    counts of training (per sample) and of the compiled plan (per step and layer) alike."""
    if multiple < 1:
        raise ValueError(f"multiple must be >= 1, got {multiple}")
    k = (ratios.detach().double() * num_tokens / multiple).round().long() * multiple
    return k.clamp(min(multiple, num_tokens), num_tokens)


def keep_counts(ratios: torch.Tensor, num_tokens: int, multiple: int = 8) -> torch.Tensor:
    """Token counts (T, L) for keep ratios (T, L): ``N r`` rounded to a multiple of ``multiple``
    (so a compiled model sees few distinct shapes), at least ``multiple``; ``FULL`` where that
    reaches all ``N`` tokens and in layer 0."""
    k = round_counts(ratios, num_tokens, multiple)
    k = torch.where(k >= num_tokens, torch.full_like(k, FULL), k)
    k[:, 0] = FULL
    return k.to(torch.int32)


@torch.no_grad()
def compile_plan(policy: RatioPolicy, timesteps: torch.Tensor, num_tokens: int, modules=("attn", "mlp"),
                 multiple: int = 8, meta: dict | None = None) -> Plan:
    """The inference plan: every step computes, each block routes the policy's token count at
    that step's timestep (``timesteps``: the scheduler's, in order)."""
    ratios = policy(torch.as_tensor(timesteps, dtype=torch.float32))
    return plan_from_ratios(ratios, num_tokens, modules, multiple, {"target": policy.target, **(meta or {})})


def plan_from_ratios(ratios: torch.Tensor, num_tokens: int, modules=("attn", "mlp"), multiple: int = 8,
                     meta: dict | None = None) -> Plan:
    """A routing plan from keep ratios (steps, layers): every step computes, each block routes
    ``keep_counts`` tokens (layer 0 never)."""
    route = keep_counts(ratios, num_tokens, multiple)
    base = full_plan(ratios.shape[0], ratios.shape[1], num_tokens, tuple(modules))
    kept = torch.where(route == FULL, torch.ones_like(ratios), route.double() / num_tokens)
    info = {"multiple": multiple, "mean_keep": float(kept[:, 1:].mean()), "ratios": ratios.tolist(), **(meta or {})}
    return Plan(num_tokens=num_tokens, modules=base.modules, anchors=base.anchors, tokens=base.tokens,
                route=route, method="shiva", meta=info)


class Budget:
    """EMA budget loss with an integral term (module docstring); ``gain=0`` is the paper's loss.

    Example::

        budget = Budget(0.8, gain=0.1)
        loss = task_loss + budget.loss(policy(t))   # updates the EMA and the integral
    """

    def __init__(self, target: float, beta: float = 0.2, weight: float = 1.0, gain: float = 0.0):
        if not 0 < target < 1 or not 0 < beta <= 1 or gain < 0:
            raise ValueError("need 0 < target < 1, 0 < beta <= 1 and gain >= 0")
        self.target, self.beta, self.weight, self.mu = float(target), float(beta), float(weight), float(target)
        self.gain, self.integral = float(gain), 0.0

    def loss(self, ratios: torch.Tensor, sync=None) -> torch.Tensor:
        """``ratios`` (B, L) from the policy (layer 0 excluded from the mean); updates the EMA and
        the integral.  ``sync``: maps this process's batch mean to the mean over all processes
        (data parallel: the EMA follows the whole batch, as in the paper)."""
        r_bar = ratios[:, 1:].mean()
        r_all = r_bar.detach() if sync is None else sync(r_bar.detach())
        self.mu = self.beta * float(r_all) + (1 - self.beta) * self.mu
        self.integral += self.gain * (self.mu - self.target)
        return self.weight * r_bar * (2 * (self.mu - self.target) + self.integral)

    def state_dict(self) -> dict:
        return {"target": self.target, "beta": self.beta, "weight": self.weight, "mu": self.mu,
                "gain": self.gain, "integral": self.integral}

    def load_state_dict(self, d: dict) -> None:
        self.target, self.beta, self.weight, self.mu = (float(d[k]) for k in ("target", "beta", "weight", "mu"))
        # checkpoints from before the integral term had none
        self.gain, self.integral = float(d.get("gain", 0.0)), float(d.get("integral", 0.0))
