"""Shiva's context-aware token router (Shiva-DiT, section 2).

Per token ``i`` of a block's image tokens ``x``::

    h_ctx = P_t(t_emb) + P_c(condition) + P_l(layer_emb)
    s_i   = w^T LayerNorm(SiLU(P_x(x_i) + h_ctx))            (bottleneck d' = 64)

One router serves each pair of adjacent layers (``share=2``; the layer embedding tells them apart).
The condition is read from the transformer call by registry data (:data:`CONDITIONS`): a class
label through the router's own embedding table (DiT; the null class included), or a pooled text
vector through a linear map (SD3, Flux), or the mean of the text tokens (PixArt).  The timestep is
embedded sinusoidally after scaling to [0, 1000] (Flux pipelines pass it in [0, 1]).

A :class:`ShivaRouter` is the callable the runtime's ``RouteHook`` asks for scores
(``router(hidden_states, call) -> (batch, tokens)``); with batched classifier-free guidance the
hook selects by the max of both halves' scores.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Condition:
    """Where a transformer class keeps the condition a router sees: the call's keyword argument
    and its kind ("class": integer labels; "vector": (B, D); "tokens": (B, L, D), mean-pooled)."""
    arg: str
    kind: str
    timestep_scale: float = 1.0  # multiplies the call's timestep into [0, 1000]


CONDITIONS: dict[str, Condition] = {
    "DiTTransformer2DModel": Condition("class_labels", "class"),
    "SD3Transformer2DModel": Condition("pooled_projections", "vector"),
    "FluxTransformer2DModel": Condition("pooled_projections", "vector", timestep_scale=1000.0),
    "PixArtTransformer2DModel": Condition("encoder_hidden_states", "tokens"),
}


def condition_of(transformer: nn.Module) -> tuple[Condition, int]:
    """The registry entry for ``transformer`` and the size of its condition (number of classes,
    null class included, or the vector's width)."""
    name = type(transformer).__name__
    if name not in CONDITIONS:
        raise ValueError(f"Shiva has no condition entry for {name}; add one to "
                         f"ditaccel.methods.shiva.router.CONDITIONS (known: {', '.join(CONDITIONS)})")
    cond, cfg = CONDITIONS[name], transformer.config
    if cond.kind == "class":
        return cond, int(cfg.num_embeds_ada_norm) + 1
    if cond.arg == "pooled_projections":
        return cond, int(cfg.pooled_projection_dim)
    return cond, int(cfg.caption_channels)  # the call's text tokens, before the caption projection


def timestep_embedding(t: torch.Tensor, dim: int = 128) -> torch.Tensor:
    """Sinusoidal embedding (B, dim) of timesteps in [0, 1000]."""
    half = dim // 2
    freqs = torch.exp(-math.log(10_000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([args.cos(), args.sin()], dim=-1)


class ShivaRouter(nn.Module):
    """Token scores for every routed layer of one transformer (see the module docstring)."""

    def __init__(self, hidden_dim: int, num_layers: int, condition: Condition, condition_size: int,
                 bottleneck: int = 64, share: int = 2, t_dim: int = 128):
        super().__init__()
        if share < 1 or bottleneck < 1:
            raise ValueError("share and bottleneck must be >= 1")
        self.condition, self.num_layers, self.share, self.t_dim = condition, num_layers, share, t_dim
        n_routers = math.ceil(num_layers / share)
        self.proj_x = nn.ModuleList(nn.Linear(hidden_dim, bottleneck) for _ in range(n_routers))
        self.proj_t = nn.ModuleList(nn.Linear(t_dim, bottleneck) for _ in range(n_routers))
        if condition.kind == "class":
            self.proj_c = nn.ModuleList(nn.Embedding(condition_size, bottleneck) for _ in range(n_routers))
        else:
            self.proj_c = nn.ModuleList(nn.Linear(condition_size, bottleneck) for _ in range(n_routers))
        self.layer_emb = nn.Embedding(num_layers, bottleneck)
        self.norm = nn.ModuleList(nn.LayerNorm(bottleneck) for _ in range(n_routers))
        self.out = nn.ModuleList(nn.Linear(bottleneck, 1) for _ in range(n_routers))
        for lin in self.out:  # start from scores that depend on the tokens, not all equal
            nn.init.normal_(lin.weight, std=bottleneck ** -0.5)
            nn.init.zeros_(lin.bias)

    @classmethod
    def for_model(cls, transformer: nn.Module, **kwargs) -> ShivaRouter:
        from ...runtime.adapters import find_blocks

        cond, size = condition_of(transformer)
        hidden = int(transformer.config.num_attention_heads * transformer.config.attention_head_dim)
        return cls(hidden, len(find_blocks(transformer)), cond, size, **kwargs)

    def context(self, call) -> tuple[torch.Tensor, torch.Tensor]:
        """(timestep, condition) of the transformer call a block belongs to."""
        kw = call.call_kwargs
        t = kw.get("timestep")
        if t is None:
            raise ValueError("the transformer call has no timestep keyword; Shiva's router needs it")
        value = kw.get(self.condition.arg, call.block_kwargs.get(self.condition.arg))
        if value is None:
            raise ValueError(f"the transformer call has no {self.condition.arg!r}; Shiva's router needs it")
        return torch.as_tensor(t).reshape(-1) * self.condition.timestep_scale, value

    def scores(self, x: torch.Tensor, layer: int, timestep: torch.Tensor, condition: torch.Tensor,
               memo: dict | None = None) -> torch.Tensor:
        """(B, N) scores of the (B, N, D) tokens ``x`` entering ``layer``.  ``memo``: a dict that
        lives for one transformer call (``RouteCall.memo``), where the part of the scores that
        depends on the timestep and condition alone is kept for the call's other layers."""
        b = x.shape[0]
        g = layer // self.share
        w = self.proj_x[g].weight
        if memo is not None and not torch.is_grad_enabled():  # every layer's context at once, once per call
            key = (id(self), id(timestep), id(condition), b)
            if key not in memo:
                memo[key] = self._layer_contexts(b, timestep, condition, x.device, w.dtype)
            h = memo[key][layer]
        else:
            h = (self._context(b, g, timestep, condition, x.device, w.dtype) + self.layer_emb.weight[layer])[:, None]
        z = self.proj_x[g](x.to(w.dtype)) + h
        return self.out[g](self.norm[g](nn.functional.silu(z))).squeeze(-1)

    def _context(self, b: int, g: int, timestep, condition, device, dtype) -> torch.Tensor:
        """(B, bottleneck): router group ``g``'s projection of the timestep and the condition."""
        t = timestep.to(device)
        t = t.expand(b) if t.numel() == 1 else t
        h = self.proj_t[g](timestep_embedding(t, self.t_dim).to(dtype))
        if self.condition.kind == "class":
            c = self.proj_c[g](condition.reshape(-1).long().to(device))
        elif self.condition.kind == "tokens":
            c = self.proj_c[g](condition.to(dtype).mean(1))
        else:
            c = self.proj_c[g](condition.to(dtype))
        return h + (c.expand(b, -1) if c.shape[0] != b else c)

    def _layer_contexts(self, b: int, timestep, condition, device, dtype) -> torch.Tensor:
        """(layers, B, 1, bottleneck): :meth:`_context` of every layer's group plus its layer
        embedding, computed for all groups at once from their weights stacked (kept while the
        parameters are unchanged)."""
        wt, bt, wc, bc, group = self._stacked()
        t = timestep.to(device)
        t = t.expand(b) if t.numel() == 1 else t
        h = torch.matmul(timestep_embedding(t, self.t_dim).to(dtype), wt.transpose(1, 2)) + bt  # (G, B, bn)
        if self.condition.kind == "class":
            c = wc[:, condition.reshape(-1).long().to(device)]
        else:
            v = condition.to(dtype).mean(1) if self.condition.kind == "tokens" else condition.to(dtype)
            c = torch.matmul(v, wc.transpose(1, 2)) + bc
        h = h + (c.expand(-1, b, -1) if c.shape[1] != b else c)
        return (h[group] + self.layer_emb.weight[:, None]).unsqueeze(2)

    def _stacked(self):
        key = tuple((p.data_ptr(), p._version) for p in self.parameters())
        cached = getattr(self, "_stack", None)
        if cached is None or cached[0] != key:
            with torch.no_grad():
                stack = (torch.stack([m.weight for m in self.proj_t]), torch.stack([m.bias for m in self.proj_t])[:, None],
                         torch.stack([m.weight for m in self.proj_c]),
                         None if self.condition.kind == "class" else torch.stack([m.bias for m in self.proj_c])[:, None],
                         torch.arange(self.num_layers, device=self.layer_emb.weight.device) // self.share)
            cached = self._stack = (key, stack)
        return cached[1]

    def forward(self, x: torch.Tensor, call) -> torch.Tensor:
        memo = getattr(call, "memo", None)
        if memo is None:
            return self.scores(x, call.layer, *self.context(call))
        # one context per transformer call (the same timestep and condition objects)
        arg = self.condition.arg
        key = (id(self), id(call.call_kwargs.get("timestep")),
               id(call.call_kwargs.get(arg, call.block_kwargs.get(arg))))
        if key not in memo:
            memo[key] = self.context(call)
        return self.scores(x, call.layer, *memo[key], memo)
