"""The hooks that execute a Plan.  They decide nothing: every choice comes from the plan."""

from __future__ import annotations

import time

import torch
from diffusers.hooks import HookRegistry, ModelHook
from torch.utils.flop_counter import FlopCounterMode

from ..plan import FULL, REUSE
from .adapters import BlockSpec
from .state import ModuleCache, PlanMismatch, RunState

STEP_HOOK = "ditaccel.step"
MODULE_HOOK = "ditaccel.module"


class StepHook(ModelHook):
    """On the transformer: tells the state which step/branch this call is, and accounts for it
    (wall time; FLOPs through FlopCounterMode when the state asks for them)."""

    def __init__(self, state: RunState, timestep_arg: str = "timestep"):
        super().__init__()
        self.state, self.timestep_arg = state, timestep_arg

    def new_forward(self, module, *args, **kwargs):
        t = kwargs.get(self.timestep_arg)
        if t is None:
            raise PlanMismatch(f"{type(module).__name__} was called without `{self.timestep_arg}`; "
                               "ditaccel needs the timestep to know the sampling step")
        x = args[0] if args else kwargs.get("hidden_states")
        record = self.state.begin_call(t, rows=int(x.shape[0]) if torch.is_tensor(x) else 0)
        original = self.fn_ref.original_forward
        t0 = time.perf_counter()
        if self.state.count_flops:
            with FlopCounterMode(display=False) as counter:
                out = original(*args, **kwargs)
            record.flops = int(counter.get_total_flops())
        else:
            out = original(*args, **kwargs)
        record.wall_s = time.perf_counter() - t0
        return out


def token_scores(x: torch.Tensor, cache: ModuleCache, score: str) -> torch.Tensor:
    """(B, N) how much each token needs fresh compute; no attention map needed."""
    if score == "delta":  # how far the module input moved since the token was last computed
        return (x - cache.ref).float().norm(dim=-1)
    if score == "feature_mean":  # how far the token stands from the mean token
        return (x - x.mean(dim=1, keepdim=True)).float().norm(dim=-1)
    raise ValueError(f"unknown token score {score!r}")


def _gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return x.gather(1, idx[..., None].expand(-1, -1, x.shape[-1]))


def _scatter(into: torch.Tensor, idx: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    return into.scatter(1, idx[..., None].expand(-1, -1, values.shape[-1]), values)


def partial_joint_attention(attn, x: torch.Tensor, x_sel: torch.Tensor, ctx: torch.Tensor):
    """SD3 joint attention with fresh queries for the selected image tokens and for all text
    tokens, against keys/values of all image and text tokens.

    diffusers' ``JointAttnProcessor2_0`` cannot be asked for this (it splits its output at the
    number of image *inputs*), so this is that processor's computation with the image queries
    taken from ``x_sel``; the projections and norms are the module's own."""
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    if type(attn.processor) is not JointAttnProcessor2_0:
        raise PlanMismatch(f"partial recompute of joint attention supports JointAttnProcessor2_0, "
                           f"not {type(attn.processor).__name__}; use a plan without partial "
                           "attention (reuse or full) for this model")
    b, heads = x.shape[0], attn.heads

    def split(t):  # (B, n, heads * d) -> (B, heads, n, d)
        return t.view(b, -1, heads, t.shape[-1] // heads).transpose(1, 2)

    q, k, v = split(attn.to_q(x_sel)), split(attn.to_k(x)), split(attn.to_v(x))
    if attn.norm_q is not None:
        q = attn.norm_q(q)
    if attn.norm_k is not None:
        k = attn.norm_k(k)
    cq, ck, cv = split(attn.add_q_proj(ctx)), split(attn.add_k_proj(ctx)), split(attn.add_v_proj(ctx))
    if attn.norm_added_q is not None:
        cq = attn.norm_added_q(cq)
    if attn.norm_added_k is not None:
        ck = attn.norm_added_k(ck)
    out = torch.nn.functional.scaled_dot_product_attention(
        torch.cat([q, cq], dim=2), torch.cat([k, ck], dim=2), torch.cat([v, cv], dim=2))
    out = out.transpose(1, 2).reshape(b, -1, out.shape[1] * out.shape[-1]).to(q.dtype)
    img, txt = out[:, :x_sel.shape[1]], out[:, x_sel.shape[1]:]
    img = attn.to_out[1](attn.to_out[0](img))
    if not attn.context_pre_only:
        txt = attn.to_add_out(txt)
    return img, txt


class ModuleHook(ModelHook):
    """On one attention / cross-attention / MLP module of one block."""

    def __init__(self, state: RunState, layer: int, role: str, module_index: int, spec: BlockSpec):
        super().__init__()
        self.state, self.layer, self.role, self.m, self.spec = state, layer, role, module_index, spec

    def new_forward(self, module, *args, **kwargs):
        st = self.state
        original = self.fn_ref.original_forward
        if st.step < 0:  # called outside a transformer call (e.g. a user probing the module)
            return original(*args, **kwargs)
        x = args[0] if args else kwargs.pop("hidden_states")
        rest = args[1:]
        key = (st.branch, self.layer, self.role)
        cache = st.caches.get(key)
        k = st.tokens_for(self.layer, self.m)
        record = st.records[-1].computed
        n = x.shape[1]
        if n != st.plan.num_tokens:
            raise PlanMismatch(f"the plan is for {st.plan.num_tokens} image tokens but layer "
                               f"{self.layer} sees {n}; make the plan for this image size")
        if k == FULL or cache is None or cache.ref.shape[0] != x.shape[0]:
            out = original(x, *rest, **kwargs)
            st.caches[key] = ModuleCache(out=out, ref=x)
            record[(self.layer, self.role)] = n
            return out
        if k == REUSE:
            record[(self.layer, self.role)] = 0
            return cache.out
        idx = token_scores(x, cache, st.plan.token_score).topk(k, dim=1).indices  # (B, k)
        x_sel = _gather(x, idx)                                                   # (B, k, D)
        text_out = None
        if self.role == "attn" and self.spec.partial_attn == "joint":
            fresh, text_out = partial_joint_attention(module, x, x_sel, kwargs["encoder_hidden_states"])
        elif self.role == "attn":
            # fresh queries for the selected tokens, fresh keys/values from all tokens
            fresh = original(x_sel, *rest, **{**kwargs, "encoder_hidden_states": x})
        else:
            fresh = original(x_sel, *rest, **kwargs)                              # (B, k, D')
        cached = cache.out[0] if isinstance(cache.out, tuple) else cache.out
        image_out = _scatter(cached, idx, fresh)
        out = (image_out, text_out) if isinstance(cache.out, tuple) else image_out
        st.caches[key] = ModuleCache(out=out, ref=_scatter(cache.ref, idx, x_sel))
        record[(self.layer, self.role)] = k
        return out


def register(module: torch.nn.Module, hook: ModelHook, name: str) -> None:
    HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, name)


def unregister(module: torch.nn.Module, name: str) -> None:
    registry = getattr(module, "_diffusers_hook", None)
    if registry is not None and registry.get_hook(name) is not None:
        registry.remove_hook(name, recurse=False)
