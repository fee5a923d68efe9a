"""Selecting tokens along the sequence dimension: the one gather and scatter the runtime (partial
recompute, routing) and Shiva's differentiable top-k share."""

from __future__ import annotations

import torch


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """(B, k, D): the tokens ``idx`` (B, k) of ``x`` (B, N, D).

    Example::

        gather_tokens(torch.arange(6.).view(1, 3, 2), torch.tensor([[2, 0]]))  # [[[4., 5.], [0., 1.]]]
    """
    return x.gather(1, idx[..., None].expand(-1, -1, x.shape[-1]))


def scatter_tokens(into: torch.Tensor, idx: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """A copy of ``into`` (B, N, D) with its tokens ``idx`` (B, k) replaced by ``values`` (B, k, D)."""
    return into.scatter(1, idx[..., None].expand(-1, -1, values.shape[-1]), values)
