"""The hooks that execute a Plan.  They decide nothing: every choice comes from the plan."""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass

import torch
from diffusers.hooks import HookRegistry, ModelHook

from ..devices import synchronize
from ..metrics import flop_counter
from ..plan import FULL, REUSE
from ..tokens import gather_tokens
from .adapters import BlockSpec
from .state import ModuleCache, PlanMismatch, RunState, _into

STEP_HOOK = "ditaccel.step"
MODULE_HOOK = "ditaccel.module"
ROUTE_HOOK = "ditaccel.route"
NORM_HOOK = "ditaccel.norm"


class StepHook(ModelHook):
    """On the transformer: tells the state which step/branch this call is, and accounts for it
    (wall time; FLOPs through FlopCounterMode when the state asks for them)."""

    def __init__(self, state: RunState, check=lambda: None, timestep_arg: str = "timestep"):
        super().__init__()
        self.state, self.check, self.timestep_arg = state, check, timestep_arg
        self.programs = None  # runtime.program.Programs when the plan runs as compiled step programs

    def new_forward(self, module, *args, **kwargs):
        self.check()
        x = args[0] if args else kwargs.get("hidden_states")
        record = self.state.begin_call(kwargs.get(self.timestep_arg),
                                       rows=int(x.shape[0]) if torch.is_tensor(x) else 0)
        self.state.call_kwargs = kwargs
        b = x.shape[0] if torch.is_tensor(x) else 0
        self.state.cfg_paired = (self.state.plan.route is not None and b % 2 == 0 and b > 0
                                 and torch.equal(x[: b // 2], x[b // 2:]))
        original = self.fn_ref.original_forward
        dev = x.device if torch.is_tensor(x) else None
        synchronize(dev)  # a CUDA call's time is its work, not its launch
        t0 = time.perf_counter()
        if self.state.count_flops:
            with flop_counter() as counter:
                out = original(*args, **kwargs)
            record.flops = int(counter.get_total_flops())
        elif self.programs is not None:
            out = self.programs.call(args, kwargs)
        else:
            out = original(*args, **kwargs)
        synchronize(dev)
        record.wall_s = time.perf_counter() - t0
        self.state.check_finite(out)
        return out


def token_scores(x: torch.Tensor, ref: torch.Tensor, score: str) -> torch.Tensor:
    """(B, N) how much each token needs fresh compute; no attention map needed.  ``ref``: the
    module input when each token was last computed."""
    if score == "delta":  # how far the module input moved since the token was last computed
        return (x - ref).float().norm(dim=-1)
    if score == "feature_mean":  # how far the token stands from the mean token
        return (x - x.mean(dim=1, keepdim=True)).float().norm(dim=-1)
    raise ValueError(f"unknown token score {score!r}")


def _widened(wide: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``wide`` (an index expanded along the last dim) for ``values``' width."""
    return wide if wide.shape[-1] == values.shape[-1] else wide[..., :1].expand(-1, -1, values.shape[-1])


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


def _heads_flux(attn, t: torch.Tensor) -> torch.Tensor:  # (B, n, H * d) -> (B, n, H, d)
    return t.unflatten(-1, (-1, attn.head_dim))


def _rope_flux(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """diffusers' ``apply_rotary_emb`` (real, interleaved pairs) for x (B, n, H, d) with cos/sin
    of shape (B or 1, n, d): per-sample positions, which the diffusers function cannot take."""
    x_real, x_imag = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
    x_rot = torch.stack([-x_imag, x_real], dim=-1).flatten(3)
    return (x.float() * cos[:, :, None] + x_rot.float() * sin[:, :, None]).to(x.dtype)


def _sdpa_bnhd(q, k, v) -> torch.Tensor:  # (B, n, H, d) layout in and out, heads flattened out
    out = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                           v.transpose(1, 2))
    return out.transpose(1, 2).flatten(2, 3)


def partial_flux_attention(attn, x: torch.Tensor, rows: torch.Tensor, ctx: torch.Tensor | None, rope):
    """Flux attention with fresh queries for the tokens ``rows`` (B, k) of ``x`` (and for all text
    tokens ``ctx`` in double-stream blocks) against keys/values of all tokens, RoPE gathered
    with the queries.  Mirrors ``FluxAttnProcessor`` with the module's own projections and norms."""
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    if type(attn.processor) is not FluxAttnProcessor or getattr(attn, "fused_projections", False):
        raise PlanMismatch(f"partial recompute of Flux attention supports FluxAttnProcessor without "
                           f"fused projections, not {type(attn.processor).__name__}; use a plan "
                           "without partial attention (reuse or full) for this model")
    b = x.shape[0]
    q = attn.norm_q(_heads_flux(attn, attn.to_q(gather_tokens(x, rows))))
    k = attn.norm_k(_heads_flux(attn, attn.to_k(x)))
    v = _heads_flux(attn, attn.to_v(x))
    tc = 0
    if ctx is not None and attn.added_kv_proj_dim is not None:
        tc = ctx.shape[1]
        q = torch.cat([attn.norm_added_q(_heads_flux(attn, attn.add_q_proj(ctx))), q], dim=1)
        k = torch.cat([attn.norm_added_k(_heads_flux(attn, attn.add_k_proj(ctx))), k], dim=1)
        v = torch.cat([_heads_flux(attn, attn.add_v_proj(ctx)), v], dim=1)
        rows = torch.cat([torch.arange(tc, device=rows.device).expand(b, tc), rows + tc], dim=1)
    if rope is not None:
        cos, sin = rope  # (text + image, d), one set of positions for the batch
        q = _rope_flux(q, cos[rows], sin[rows])
        k = _rope_flux(k, cos[None], sin[None])
    out = _sdpa_bnhd(q, k, v).to(q.dtype)
    if not tc:
        return out
    txt, img = out[:, :tc], out[:, tc:]
    return attn.to_out[1](attn.to_out[0](img.contiguous())), attn.to_add_out(txt.contiguous())


def partial_wan_attention(attn, x: torch.Tensor, rows: torch.Tensor, rope):
    """Wan self-attention with fresh queries for the tokens ``rows`` (B, k) against keys/values of
    all tokens, RoPE gathered with the queries.  Mirrors ``WanAttnProcessor`` (text-to-video)."""
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    if (type(attn.processor) is not WanAttnProcessor or getattr(attn, "fused_projections", False)
            or attn.add_k_proj is not None):
        raise PlanMismatch(f"partial recompute of Wan self-attention supports WanAttnProcessor "
                           f"(text-to-video, unfused), not {type(attn.processor).__name__}; use a plan "
                           "without partial attention (reuse or full) for this model")

    def heads(t):
        return t.unflatten(2, (attn.heads, -1))

    q = heads(attn.norm_q(attn.to_q(gather_tokens(x, rows))))
    k, v = heads(attn.norm_k(attn.to_k(x))), heads(attn.to_v(x))
    if rope is not None:
        cos, sin = rope  # (1, n, 1, d)
        idx = rows[:, :, None, None].expand(-1, -1, 1, cos.shape[-1])
        q = _rope_wan(q, cos.expand(x.shape[0], -1, -1, -1).gather(1, idx),
                      sin.expand(x.shape[0], -1, -1, -1).gather(1, idx))
        k = _rope_wan(k, cos, sin)
    out = _sdpa_bnhd(q, k, v).type_as(q)
    return attn.to_out[1](attn.to_out[0](out))


def _rope_wan(x, cos, sin):
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


def positional(cls) -> tuple[str, ...]:
    """The names of ``cls.forward``'s positional parameters after ``self`` (kept as a tuple: a
    compiled program reads it without touching ``inspect``'s mapping proxies)."""
    params = list(inspect.signature(cls.forward).parameters.values())[1:]
    return tuple(p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))


def _named(names: tuple[str, ...], args: tuple, kwargs: dict) -> dict:
    """A call's arguments by name (positional ones named from the forward's ``positional`` names)."""
    if len(args) > len(names):
        raise PlanMismatch(f"unexpected positional arguments: {len(args)} for ({', '.join(names)})")
    return {**dict(zip(names, args)), **kwargs}


class ModuleHook(ModelHook):
    """On one attention / cross-attention / MLP module of one block."""

    def __init__(self, state: RunState, layer: int, role: str, module_index: int, spec: BlockSpec,
                 module: torch.nn.Module):
        super().__init__()
        self.state, self.layer, self.role, self.m, self.spec = state, layer, role, module_index, spec
        # What later steps of the plan read from this module's cache (a pure function of the plan).
        plan = state.plan
        later = plan.tokens[~plan.anchors, layer, module_index]
        self.keep_out = bool((later != FULL).any())
        self.keep_ref = self.keep_out and plan.token_score == "delta" and bool((later > 0).any())
        # some step forecasts this module: its cache keeps the last two full outputs (and is
        # never patched with fresh tokens)
        self.forecast = self.keep_out and state.history_list[layer][module_index]
        self.signature = positional(type(module))
        self.slot = f"{layer}.{role}"

    def new_forward(self, module, *args, **kwargs):
        st = self.state
        original = self.fn_ref.original_forward
        if st.program is not None:
            return self._program_forward(st.program, module, original, args, kwargs)
        if st.step < 0:  # called outside a transformer call (e.g. a user probing the module)
            return original(*args, **kwargs)
        record = st.records[-1].computed
        if st.routed_tokens is not None:  # inside a routed block: it runs on the routed tokens
            record[(self.layer, self.role)] = st.routed_tokens
            return original(*args, **kwargs)
        if (self.layer, self.role) in st.skipped_inputs:  # its norm ran on one token: reuse
            st.skipped_inputs.discard((self.layer, self.role))
            record[(self.layer, self.role)] = 0
            return self._reused(st.caches[(st.branch, self.layer, self.role)])
        x = args[0] if args else kwargs.pop("hidden_states")
        rest = args[1:]
        k = st.tokens_for(self.layer, self.m)
        n_all, n = x.shape[1], st.plan.num_tokens
        text = n_all - n if self.spec.module_tokens == "text_prefix" else 0
        if text < 0 or (self.spec.module_tokens == "image" and n_all != n):
            raise PlanMismatch(f"the plan is for {n} image tokens but layer {self.layer} sees "
                               f"{n_all - max(text, 0)}; make the plan for this image size")
        cache = st.caches.get((st.branch, self.layer, self.role))
        if k == FULL or cache is None or not cache.valid(x, st.generation):
            out = original(x, *rest, **kwargs)
            if self.keep_out:  # only what a later step of the plan reads is kept
                if cache is None:
                    cache = st.caches[(st.branch, self.layer, self.role)] = ModuleCache()
                cache.store(out, x, self.keep_ref, st.generation, st.step, self.forecast)
            record[(self.layer, self.role)] = n
            return out
        if k == REUSE:
            record[(self.layer, self.role)] = 0
            return self._reused(cache)
        ref = cache.ref if cache.ref is not None else x
        wide, x_sel, fresh, text_out = self._fresh(module, original, x, rest, kwargs, k, ref, text)
        if cache.ref is not None:  # where the fresh tokens were computed from
            cache.ref.scatter_(1, _widened(wide, x_sel), x_sel)
        record[(self.layer, self.role)] = k
        if self.forecast:  # the fresh tokens over this step's forecast; the cache keeps full outputs
            out = cache.forecast(st.step, st.fill_list[st.step][self.layer][self.m])
            image = out[0] if isinstance(out, tuple) else out
            image.scatter_(1, _widened(wide, fresh), fresh.to(image.dtype))
            if isinstance(out, tuple) and text_out is not None:
                out = (out[0], text_out, *out[2:])
            return st.watch(self.layer, self.role, out)
        # patch the cache in place: the fresh tokens
        cache.image_out.scatter_(1, _widened(wide, fresh), fresh.to(cache.image_out.dtype))
        if isinstance(cache.out, tuple) and text_out is not None:
            cache.out = (cache.out[0], _into(cache.out[1], text_out), *cache.out[2:])
        cache.touched()
        return st.watch(self.layer, self.role, cache.give())

    def _fresh(self, module, original, x, rest, kwargs, k: int, ref: torch.Tensor, text: int):
        """Partial recompute: the ``k`` image tokens whose input moved most (by the plan's token
        score against ``ref``), and the module's output for them (and for every text token).
        Returns (the indices as a (B, k', D) index of ``x``'s width, their inputs, their outputs,
        the text tokens' output or None)."""
        if text:  # text tokens are always computed
            idx = token_scores(x[:, text:], ref[:, text:], self.state.plan.token_score).topk(k, dim=1).indices + text
            idx = torch.cat([torch.arange(text, device=idx.device).expand(x.shape[0], text), idx], dim=1)
        else:
            idx = token_scores(x, ref, self.state.plan.token_score).topk(k, dim=1).indices
        wide = idx[..., None].expand(-1, -1, x.shape[-1])  # made once: the gather and the scatters
        x_sel = x.gather(1, wide)                                                  # (B, k, D)
        text_out = None
        if self.role != "attn":
            fresh = original(x_sel, *rest, **kwargs)                              # (B, k, D')
        elif self.spec.partial_attn == "kv_from_encoder_states":
            # fresh queries for the selected tokens, fresh keys/values from all tokens
            fresh = original(x_sel, *rest, **{**kwargs, "encoder_hidden_states": x})
        else:
            named = _named(self.signature, (x, *rest), kwargs)
            if self.spec.partial_attn == "joint":
                fresh, text_out = partial_joint_attention(module, x, x_sel, named["encoder_hidden_states"])
            elif self.spec.partial_attn == "flux":
                fresh = partial_flux_attention(module, x, idx, named.get("encoder_hidden_states"),
                                               named.get("image_rotary_emb"))
                if isinstance(fresh, tuple):
                    fresh, text_out = fresh
            elif self.spec.partial_attn == "wan":
                fresh = partial_wan_attention(module, x, idx, named.get("rotary_emb"))
            else:
                raise PlanMismatch(f"unknown partial attention kind {self.spec.partial_attn!r}")
        return wide, x_sel, fresh, text_out

    def _program_forward(self, ctx, module, original, args, kwargs):
        """The step-program path (``runtime.program``): the action is the program's, a constant;
        cached outputs come from and go to the context, never waiting for the device."""
        from .program import forecast_of

        program = ctx.program
        if program.route is not None and program.route[self.layer] != FULL:
            return original(*args, **kwargs)  # inside a routed block: it runs on the routed tokens
        action = program.modules[self.layer][self.m]
        x = args[0] if args else kwargs.pop("hidden_states")
        rest = args[1:]
        n_all, n = x.shape[1], self.state.plan.num_tokens
        text = n_all - n if self.spec.module_tokens == "text_prefix" else 0
        if text < 0 or (self.spec.module_tokens == "image" and n_all != n):
            raise PlanMismatch(f"the plan is for {n} image tokens but layer {self.layer} sees "
                               f"{n_all - max(text, 0)}; make the plan for this image size")
        name = self.slot
        if action.tokens == FULL:
            out = original(x, *rest, **kwargs)
            if action.store:
                ctx.new[name] = out
            if action.ref:  # a copy: two modules may share one input (Flux's single blocks)
                ctx.new[name + ":ref"] = x.clone()
            return out
        base = forecast_of(ctx, name, action)
        if action.tokens == REUSE:
            return base
        ref = ctx.bank.get(name + ":ref", x)
        wide, x_sel, fresh, text_out = self._fresh(module, original, x, rest, kwargs, action.tokens, ref, text)
        image = base[0] if isinstance(base, tuple) else base
        patched = image.scatter(1, _widened(wide, fresh), fresh.to(image.dtype))
        out = patched
        if isinstance(base, tuple):
            out = (patched, base[1] if text_out is None else text_out, *base[2:])
        if action.ref:
            ctx.new[name + ":ref"] = ref.scatter(1, _widened(wide, x_sel), x_sel)
        if action.patch:  # the patched output is the cache (a forecasting module's keeps full outputs)
            ctx.new[name] = out
        return out

    def _reused(self, cache: ModuleCache):
        """The cached output, or its forecast.  Only a forecast is watched for NaN/Inf: a plain
        reuse gives values computed on a full step, whose transformer output was checked then."""
        st = self.state
        if self.forecast and st.fill_list[st.step][self.layer][self.m]:
            return st.watch(self.layer, self.role, cache.forecast(st.step))
        return cache.give()


class ConditioningTable:
    """One block's conditioning (the outputs of its conditioning norm) for the steps of a
    trajectory that reuse the module the norm feeds, computed in one call of the norm on all those
    steps' timesteps at once.  A step's slice is served only while the call's timestep is the
    scheduler's for that step and its class labels are the ones the table was built with."""

    def __init__(self, steps: list[int], timesteps: torch.Tensor, labels, out: tuple, rows: int):
        self.index = {s: i for i, s in enumerate(steps)}
        self.timesteps, self.labels, self.out, self.rows = timesteps, labels, out, rows

    def get(self, step: int, timestep: torch.Tensor, labels):
        i = self.index.get(step)
        if i is None:
            return None
        rows = slice(i * self.rows, (i + 1) * self.rows)
        if not torch.equal(timestep, self.timesteps[rows]) or not _same(labels, self.labels):
            return None
        return tuple(o[rows] for o in self.out)


def _same(a, b) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return torch.is_tensor(a) and torch.is_tensor(b) and torch.equal(a, b)


class NormSkipHook(ModelHook):
    """On the norm feeding one module: when that module will return its cache at this step, the
    norm runs on one token only, and the module (told so through the state) returns its cache
    without looking at its input.  The block's own elementwise work on that input (adaLN
    modulation) then also runs on one token.

    With ``conditioning`` (the block's conditioning norm, ``BlockSpec.conditioning_norm``), the
    norm's outputs on those steps come from a :class:`ConditioningTable` built at the first of
    them for all of them: each DiT block embeds the timestep and class label again, which on a
    step that reuses the block's modules is most of what is left to compute, and in one batched
    call costs a fraction of that."""

    def __init__(self, state: RunState, layer: int, role: str, module_index: int,
                 module: torch.nn.Module | None = None, conditioning: bool = False):
        super().__init__()
        self.state, self.layer, self.role, self.m = state, layer, role, module_index
        self.conditioning = conditioning
        if conditioning:
            self.signature = positional(type(module))

    def new_forward(self, module, *args, **kwargs):
        st = self.state
        original = self.fn_ref.original_forward
        if st.program is not None:  # a step program: the compiler drops what the reused module ignores
            return original(*args, **kwargs)
        if st.step >= 0 and st.routed_tokens is None and args and st.tokens_for(self.layer, self.m) == REUSE:
            x = args[0]
            cache = st.caches.get((st.branch, self.layer, self.role))
            if cache is not None and cache.valid(x, st.generation):
                st.skipped_inputs.add((self.layer, self.role))
                out = self._table(original, x, args, kwargs) if self.conditioning else None
                return out if out is not None else original(x[:, :1], *args[1:], **kwargs)
        return original(*args, **kwargs)

    def _table(self, original, x: torch.Tensor, args, kwargs):
        """This step's slice of the block's conditioning table (built now if this is the first
        reusing step of the trajectory), or None where the call cannot be served from one."""
        st = self.state
        named = _named(self.signature, args, kwargs)
        timestep, labels = named.get("timestep"), named.get("class_labels")
        key = (self.layer, st.branch)
        if key not in st.conditioning:
            st.conditioning[key] = self._build(original, x, named, timestep, labels)
        table = st.conditioning[key]
        return None if table is None else table.get(st.step, timestep, labels)

    def _build(self, original, x: torch.Tensor, named: dict, timestep, labels):
        st, plan = self.state, self.state.plan
        scheduler = st.scheduler
        if (scheduler is None or named.get("emb") is not None or not torch.is_tensor(timestep)
                or timestep.ndim != 1 or (labels is not None and not torch.is_tensor(labels))):
            return None
        sched = getattr(scheduler, "timesteps", None)
        if not torch.is_tensor(sched) or len(sched) != plan.num_steps:
            return None

        def expected(s: int) -> torch.Tensor:  # what the pipeline passes at step s
            return sched[s].to(timestep).expand_as(timestep)

        if not torch.equal(timestep, expected(st.step)):  # the pipeline passes something else
            return None
        # collapsed steps get their gates there (this one too, unless it fell back to the blocks)
        collapsed = st.collapse_steps or [False] * plan.num_steps
        steps = [s for s in range(st.step, plan.num_steps) if not bool(plan.anchors[s])
                 and (s == st.step or not collapsed[s]) and int(plan.tokens[s, self.layer, self.m]) == REUSE]
        timesteps = st.timesteps_at(steps, timestep)
        batched = {**named, next(iter(named)): x[:, :1].repeat(len(steps), 1, 1), "timestep": timesteps,
                   "class_labels": None if labels is None else labels.repeat(len(steps))}
        out = original(**batched)
        if not isinstance(out, tuple):
            return None
        return ConditioningTable(steps, timesteps, None if labels is None else labels.clone(), out,
                                 rows=int(timestep.shape[0]))


@dataclass
class RouteCall:
    """What a router is told about the block call it scores tokens for (``step`` and ``branch``
    are None when the plan runs as compiled step programs: one program serves several steps)."""
    layer: int
    step: int | None
    num_steps: int
    branch: int | None
    block_kwargs: dict   # the block's arguments by name (timestep / temb, text tokens, ...)
    call_kwargs: dict    # the transformer call's keyword arguments (timestep, class labels, ...)
    cfg_paired: bool     # the batch is [branch A; branch B] of the same latents (batched CFG)
    # a dict that lives for this transformer call (None in compiled programs): a router keeps
    # there what every block of the call shares (its timestep features)
    memo: dict | None = None


class RouteHook(ModelHook):
    """On a block: where the plan routes ``k`` tokens at this (step, layer), the block runs on the
    ``k`` tokens the router scores highest and the others skip it unchanged (the Shiva operation).
    With batched classifier-free guidance both halves keep the same tokens: max of their scores."""

    def __init__(self, state: RunState, layer: int, spec: BlockSpec, block: torch.nn.Module, router,
                 compile_options: dict | None = None, roles: tuple[str, ...] = ()):
        super().__init__()
        self.state, self.layer, self.spec, self.router = state, layer, spec, router
        self.signature = positional(type(block))
        self.compile_options, self._compiled = compile_options, None
        self.roles = roles  # this block's modules that carry no module hook (see apply): recorded here

    def _forward(self):
        """The block's own forward, through torch.compile when asked (the hooks stay eager)."""
        original = self.fn_ref.original_forward
        if self.compile_options is None or self.state.count_flops:  # FLOPs are counted eagerly
            return original
        if self._compiled is None:
            self._compiled = torch.compile(original, **self.compile_options)
        return self._compiled

    def new_forward(self, block, *args, **kwargs):
        st = self.state
        if st.program is not None:
            return self._program_forward(st.program, args, kwargs)
        original = self._forward()
        route = st.plan.route
        k = FULL if route is None or st.step < 0 else st.route_list[st.step][self.layer]
        if k == FULL:  # (no record needed: a module without one ran in full)
            if original is not self.fn_ref.original_forward:
                # compiled: the first block's input comes strided from the patch embedding; one
                # layout for every block keeps it to one graph per shape
                named = _named(self.signature, args, kwargs)
                named[self.spec.image_arg] = named[self.spec.image_arg].contiguous()
                return original(**named)
            return original(*args, **kwargs)
        named = _named(self.signature, args, kwargs)
        x = named[self.spec.image_arg]
        b, n = x.shape[:2]
        if n != st.plan.num_tokens:
            raise PlanMismatch(f"the plan is for {st.plan.num_tokens} image tokens but layer "
                               f"{self.layer} sees {n}; make the plan for this image size")
        call = RouteCall(self.layer, st.step, st.plan.num_steps, st.branch, named, st.call_kwargs,
                         st.cfg_paired, st.call_memo)
        scores = self.router(x, call)
        if tuple(scores.shape) != (b, n):
            raise PlanMismatch(f"the router returned scores of shape {tuple(scores.shape)}, "
                               f"expected (batch, image tokens) = {(b, n)}")
        idx = self._select(scores, k, st.cfg_paired)
        st.records[-1].computed.update({(self.layer, r): k for r in self.roles})
        st.routed_tokens = k
        try:
            out = self._run(original, named, x, idx)
        finally:
            st.routed_tokens = None
        return st.watch(self.layer, "block", out)

    @staticmethod
    def _select(scores: torch.Tensor, k: int, cfg_paired: bool) -> torch.Tensor:
        """(B, k) indices of the ``k`` highest scores, in token order; with batched classifier-free
        guidance both halves keep the same tokens (max of their scores)."""
        if cfg_paired:  # one choice for both halves, repeated
            b, n = scores.shape
            return scores.view(2, b // 2, n).amax(0).topk(k, dim=1).indices.sort(dim=1).values.repeat(2, 1)
        return scores.topk(k, dim=1).indices.sort(dim=1).values

    def _program_forward(self, ctx, args, kwargs):
        """The step-program path (``runtime.program``): the routed count is the program's."""
        original = self.fn_ref.original_forward
        k = ctx.program.route[self.layer]
        if k == FULL:
            return original(*args, **kwargs)
        st = self.state
        named = _named(self.signature, args, kwargs)
        x = named[self.spec.image_arg]
        if x.shape[1] != st.plan.num_tokens:
            raise PlanMismatch(f"the plan is for {st.plan.num_tokens} image tokens but layer "
                               f"{self.layer} sees {x.shape[1]}; make the plan for this image size")
        # (a program serves every step of its pattern: the step and branch are not the router's to read)
        call = RouteCall(self.layer, None, st.plan.num_steps, None, named, st.call_kwargs, ctx.program.cfg_paired)
        idx = self._select(self.router(x, call), k, ctx.program.cfg_paired)
        return self._run(original, named, x, idx)

    def _run(self, original, named, x, idx):
        spec = self.spec
        rope = named.get(spec.rope_arg) if spec.rope_arg else None
        groups = [(slice(None), idx)]
        if rope is not None and spec.rope_layout == "flux" and not bool((idx == idx[:1]).all()):
            # Flux positions have no batch dimension: run each sample's token set on its own
            groups = [(slice(i, i + 1), idx[i:i + 1]) for i in range(x.shape[0])]
        wide = idx[..., None].expand(-1, -1, x.shape[-1])  # made once: the gather and the scatter
        outs = []
        for rows, sel in groups:
            if len(groups) == 1:  # every row: the call's own tensors, not views of them (an embedder table knows them)
                args = dict(named)
                args[spec.image_arg] = x.gather(1, wide)
            else:
                args = {name: (v[rows] if torch.is_tensor(v) and v.shape[:1] == x.shape[:1] and name != spec.rope_arg
                               else v) for name, v in named.items()}
                args[spec.image_arg] = gather_tokens(x[rows], sel)
            if rope is not None:
                args[spec.rope_arg] = self._gather_rope(rope, sel, args)
            outs.append(original(**args))
        out = outs[0] if len(outs) == 1 else _cat_outputs(outs)
        image = out if spec.image_output is None else out[spec.image_output]
        merged = x.scatter(1, _widened(wide, image), image.to(x.dtype))
        if spec.image_output is None:
            return merged
        out = list(out)
        out[spec.image_output] = merged
        return tuple(out)

    def _gather_rope(self, rope, sel, args):
        cos, sin = rope
        if self.spec.rope_layout == "flux":  # (text + image, d): text rows first
            text = args[self.spec.text_arg].shape[1]
            rows = torch.cat([torch.arange(text, device=sel.device), sel[0] + text])
            return cos[rows], sin[rows]
        if self.spec.rope_layout == "wan":  # (1, image, 1, d)
            idx = sel[:, :, None, None].expand(-1, -1, 1, cos.shape[-1])
            return (cos.expand(sel.shape[0], -1, -1, -1).gather(1, idx),
                    sin.expand(sel.shape[0], -1, -1, -1).gather(1, idx))
        raise PlanMismatch(f"unknown position layout {self.spec.rope_layout!r}")


def _cat_outputs(outs):
    if torch.is_tensor(outs[0]):
        return torch.cat(outs)
    return tuple(None if o[0] is None else torch.cat(list(o)) for o in zip(*outs))


def register(module: torch.nn.Module, hook: ModelHook, name: str) -> None:
    HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, name)


def unregister(module: torch.nn.Module, name: str) -> None:
    """Remove hook ``name``; once a module has no hooks left, it is left as it was before any
    (diffusers' registry leaves the bound original ``forward`` as an instance attribute, which
    would hide a later change of the module's class, such as tomesd's patch)."""
    registry = getattr(module, "_diffusers_hook", None)
    if registry is not None and registry.get_hook(name) is not None:
        registry.remove_hook(name, recurse=False)
        if not registry.hooks:
            fwd = module.__dict__.get("forward")
            if fwd is not None and getattr(fwd, "__func__", None) is type(module).forward \
                    and getattr(fwd, "__self__", None) is module:
                del module.__dict__["forward"]
