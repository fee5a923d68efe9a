"""Residual-based differentiable top-k (Shiva-DiT, section 1).

Forward: exactly ``k`` tokens (hard top-k of the scores) go through the block, the others skip it
unchanged, so shapes are static.  Backward: a soft descending rank of the (noisy) scores gives each
token an inclusion probability ``pi_i = sigmoid((k_soft - rank_i) / (tau_sel * N))``; gradients
reach the scores (the router) and ``k_soft`` (the ratio policy) through ``pi``, with values in the
forward pass unchanged (straight-through terms ``pi - stopgrad(pi)``).

How ``dL/dpi_i`` is estimated (``estimator``):

- ``"residual"`` (ours, default): the first-order change of the loss when token ``i`` takes the
  block instead of the identity path is ``<dL/dy_i, f_i>``, ``f_i`` the block's residual
  (output - input) for that token.  Single path: a selected token's residual is computed, so its
  output is ``x_i + (1 + pi_i - sg(pi_i)) f_i``; a rejected token's residual is not, and is stood
  in for by the mean residual of the selected tokens of its sample (no gradient through it).
- ``"input-scaling"``: the paper's estimator as our notes read it: a selected token's block input
  is scaled by ``1 + pi_i - sg(pi_i)``, a rejected token's output by ``1 + (1 - pi_i) - sg(1 - pi_i)``,
  giving ``<grad, x_i>`` and ``-<grad, x_i>``.
- ``"dual"``: the exact surrogate, every token's residual computed (twice the block cost): the
  reference the single-path estimators are measured against.

Measured on a synthetic task where the best k is known (``benchmarks/shiva_topk.py``): the
residual estimator's gradient points the way of the exact surrogate's and learns k from either
side; the input-scaling reading does neither, so it is here for that comparison only.
"""

from __future__ import annotations

from typing import Callable

import torch

from ...tokens import gather_tokens, scatter_tokens

ESTIMATORS = ("residual", "input-scaling", "dual")


def soft_rank(scores: torch.Tensor, tau_rank: float) -> torch.Tensor:
    """Soft descending rank ``1 + sum_{j != i} sigmoid((s_j - s_i) / tau)`` of (B, N) scores
    (1 for the highest).  O(B N^2) memory."""
    diff = (scores[:, None, :] - scores[:, :, None]) / tau_rank      # [b, i, j] = s_j - s_i
    return 0.5 + torch.sigmoid(diff).sum(-1)                          # the j == i term is 0.5


def inclusion_probability(scores: torch.Tensor, k_soft, tau_rank: float = 0.2, tau_sel: float = 0.1) -> torch.Tensor:
    """``pi_i = sigmoid((k - rank_i) / (tau_sel N))`` for (B, N) scores; ``k_soft`` a float, a
    scalar tensor or a (B,) tensor (continuous, so that it gets a gradient)."""
    k = torch.as_tensor(k_soft, dtype=scores.dtype, device=scores.device)
    if k.dim() == 1:
        k = k[:, None]
    return torch.sigmoid((k - soft_rank(scores, tau_rank)) / (tau_sel * scores.shape[1]))


def select(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (B, k) of the ``k`` highest scores per row, in token order."""
    return scores.topk(k, dim=1).indices.sort(dim=1).values


def residual_topk(x: torch.Tensor, scores: torch.Tensor, k: int, block: Callable[[torch.Tensor], torch.Tensor], *,
                  k_soft=None, tau_rank: float = 0.2, tau_sel: float = 0.1, noise_std: float = 0.0,
                  generator: torch.Generator | None = None, estimator: str = "residual") -> torch.Tensor:
    """Run ``block`` (a map of (B, k, D) tokens to its output, residual included) on the ``k``
    tokens of ``x`` (B, N, D) with the highest ``scores`` (B, N); the others pass unchanged.

    ``k_soft`` (default ``k``): the continuous budget the inclusion probabilities use, through
    which a ratio policy gets its gradient.  ``noise_std``: exploration noise added to the scores
    before both the hard selection and the soft rank (training only)."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; use one of {', '.join(ESTIMATORS)}")
    b, n, _ = x.shape
    if tuple(scores.shape) != (b, n):
        raise ValueError(f"scores must have shape (batch, tokens) = {(b, n)}, got {tuple(scores.shape)}")
    if not 1 <= k <= n:
        raise ValueError(f"k must be in 1..{n}, got {k}")
    if noise_std > 0:
        scores = scores + noise_std * torch.randn(scores.shape, generator=generator, device=scores.device,
                                                  dtype=scores.dtype)
    pi = inclusion_probability(scores, k if k_soft is None else k_soft, tau_rank, tau_sel)
    ste = (pi - pi.detach()).to(x.dtype)                 # 0 forward, d/dpi = 1 backward
    idx = select(scores.detach(), k)
    if estimator == "dual":
        chosen = torch.zeros(b, n, dtype=x.dtype, device=x.device).scatter(1, idx, 1.0)
        return x + (chosen + ste)[..., None] * (block(x) - x)
    xs = gather_tokens(x, idx)
    if estimator == "input-scaling":
        ys = block(xs * (1 + ste.gather(1, idx))[..., None])
        return scatter_tokens(x * (1 - ste)[..., None], idx, ys)
    fs = block(xs) - xs
    out = x + ste[..., None] * fs.mean(1, keepdim=True).detach()   # rejected: mean residual stands in
    return scatter_tokens(out, idx, xs + (1 + ste.gather(1, idx))[..., None] * fs)
