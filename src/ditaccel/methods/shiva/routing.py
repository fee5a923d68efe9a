"""Shiva's routing during training: every block but the first runs on the tokens its router scores
highest, through the differentiable top-k (:func:`.topk.residual_topk`), with a keep ratio per
sample and layer from the ratio policy.

At inference the runtime's ``RouteHook`` executes a compiled plan (one token count per step and
layer, hard top-k); here the counts differ per sample (each sample of a training batch has its
own timestep, so its own ratio), so the batch is split into groups of equal count (counts rounded
to a multiple of ``multiple`` keep the groups few) and each group runs the block once.  The
forward values equal the inference path's for the same counts and scores (tested); gradients
reach the router's scores and, through the continuous count ``N r``, the policy.

    with TrainRouting(transformer, router) as routing:
        routing.ratios = policy(t)              # (B, L) for this batch
        out = transformer(x_t, timestep=t, class_labels=y).sample
"""

from __future__ import annotations


import torch
from diffusers.hooks import ModelHook

from ...runtime.adapters import find_blocks
from ...runtime.hooks import RouteCall, _named, positional, register, unregister
from .policy import round_counts
from .topk import residual_topk

TRAIN_HOOK = "ditaccel.shiva.train"
CALL_HOOK = "ditaccel.shiva.call"


class _CallHook(ModelHook):
    def __init__(self, routing: TrainRouting):
        super().__init__()
        self.routing = routing

    def new_forward(self, module, *args, **kwargs):
        self.routing.call_kwargs = kwargs
        try:
            return self.fn_ref.original_forward(*args, **kwargs)
        finally:
            self.routing.call_kwargs = {}


class _BlockHook(ModelHook):
    def __init__(self, routing: TrainRouting, layer: int, spec, block):
        super().__init__()
        self.routing, self.layer, self.spec = routing, layer, spec
        self.signature = positional(type(block))

    def new_forward(self, block, *args, **kwargs):
        rt, spec = self.routing, self.spec
        original = self.fn_ref.original_forward
        if not rt.enabled:
            return original(*args, **kwargs)
        if rt.ratios is None:
            raise RuntimeError("set TrainRouting.ratios (the policy's (batch, layers) keep ratios) before the forward")
        named = _named(self.signature, args, kwargs)
        x = named[spec.image_arg]
        b, n = x.shape[:2]
        call = RouteCall(self.layer, -1, 0, 0, named, rt.call_kwargs, False)
        scores = rt.router(x, call)
        if rt.noise_std > 0:
            # exploration noise drawn for the whole batch, this process's rows taken: the same
            # noise per sample however the batch is split across processes
            full = torch.randn((rt.global_batch or b, n), dtype=scores.dtype)
            scores = scores + rt.noise_std * full[rt.rows].to(scores.device)
        ratio = rt.ratios[:, self.layer]
        counts = round_counts(ratio, n, rt.multiple)
        pieces, order = [], []
        for k in counts.unique().tolist():
            rows = (counts == k).nonzero().flatten()
            sub = {name: (v[rows] if torch.is_tensor(v) and v.shape[:1] == (b,) else v) for name, v in named.items()}
            kept = {}

            def block_fn(xs, sub=sub, kept=kept):
                out = original(**{**sub, spec.image_arg: xs})
                if spec.image_output is None:
                    return out
                kept["out"] = out
                return out[spec.image_output]
            if k >= n:
                image = block_fn(x[rows])
            else:
                image = residual_topk(x[rows], scores[rows], int(k), block_fn, k_soft=n * ratio[rows],
                                      tau_rank=rt.tau_rank, tau_sel=rt.tau_sel, estimator=rt.estimator)
            pieces.append(image if spec.image_output is None else
                          tuple(image if i == spec.image_output else o for i, o in enumerate(kept["out"])))
            order.append(rows)
        inverse = torch.empty(b, dtype=torch.long, device=x.device)
        inverse[torch.cat(order)] = torch.arange(b, device=x.device)
        if spec.image_output is None:
            return torch.cat(pieces)[inverse]
        return tuple(None if parts[0] is None else torch.cat(list(parts))[inverse] for parts in zip(*pieces))


class TrainRouting:
    """Context manager: Shiva's differentiable routing on every block but the first of
    ``transformer`` (module docstring).  Attributes set per batch: ``ratios`` (B, L) from the
    policy, ``noise_std`` (exploration noise on the scores), ``tau_rank`` / ``tau_sel``;
    ``enabled`` False runs every block in full (the frozen teacher's pass)."""

    def __init__(self, transformer: torch.nn.Module, router, multiple: int = 8, tau_rank: float = 0.2,
                 tau_sel: float = 0.1, noise_std: float = 0.0, estimator: str = "residual"):
        self.transformer, self.router, self.multiple = transformer, router, multiple
        self.tau_rank, self.tau_sel, self.noise_std, self.estimator = tau_rank, tau_sel, noise_std, estimator
        self.ratios: torch.Tensor | None = None
        # data parallel: this process's rows of a batch of global_batch rows (None: all of it)
        self.rows, self.global_batch = slice(None), None
        self.enabled = True
        self.call_kwargs: dict = {}
        self.blocks = find_blocks(transformer)
        bad = sorted({type(b).__name__ for _, b, spec in self.blocks if spec.rope_arg})
        if bad:
            raise ValueError(f"Shiva training does not gather rotary positions yet ({', '.join(bad)}); "
                             "train on a model whose blocks take absolute positions (DiT, PixArt, SD3)")

    def __enter__(self) -> TrainRouting:
        register(self.transformer, _CallHook(self), CALL_HOOK)
        for layer, (_, block, spec) in enumerate(self.blocks):
            if layer > 0:  # the first block is never routed
                register(block, _BlockHook(self, layer, spec, block), TRAIN_HOOK)
        return self

    def __exit__(self, *exc) -> None:
        for _, block, _ in self.blocks:
            unregister(block, TRAIN_HOOK)
        unregister(self.transformer, CALL_HOOK)
