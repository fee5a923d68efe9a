"""Attach a Plan to a pipeline or transformer, and take it off again."""

from __future__ import annotations

import functools

import torch

from ..io import model_fingerprint
from ..plan import FULL, REUSE, Plan
from .adapters import block_modules, find_blocks, transformer_of
from .hooks import (MODULE_HOOK, NORM_HOOK, ROUTE_HOOK, STEP_HOOK, ModuleHook, NormSkipHook, RouteHook,
                    StepHook, register, unregister)
from .embed import EMBED_HOOK, ChainHook
from .program import CompileConfig
from .collapse import collapsible_steps
from .state import PlanMismatch, RunState

_STATE_ATTR = "_ditaccel_state"


def _split(target) -> tuple[torch.nn.Module, object | None]:
    transformer = transformer_of(target)
    return transformer, (None if transformer is target else target)


def as_plan(plan) -> Plan:
    """``plan`` as a :class:`Plan`: a Plan, the path of a plan JSON, or its dict."""
    import os

    if isinstance(plan, Plan):
        return plan
    if isinstance(plan, (str, os.PathLike)):
        return Plan.load(plan)
    if isinstance(plan, dict):
        return Plan.from_dict(plan)
    raise TypeError(f"plan must be a ditaccel Plan, the path of a plan JSON or its dict, got "
                    f"{type(plan).__name__}")


def apply(target, plan: Plan, router=None, check_fingerprint: bool = True, skip_reused_norms: bool = True,
          compile: bool | dict = False, nan_guard: bool = True, batch_conditioning: bool = True,
          collapse: bool = True):
    """Execute ``plan`` on every call of the target's transformer (a diffusers pipeline or the
    transformer itself).  Applying again replaces the previous plan; :func:`remove` restores the
    original forward functions.

    ``router``, needed by plans that route tokens through blocks (``plan.route``), is a callable
    ``router(hidden_states, call) -> scores`` giving (batch, image tokens) scores for the block
    input; ``call`` is a :class:`~ditaccel.runtime.hooks.RouteCall` (layer, step, the block's and
    the transformer call's arguments).

    ``skip_reused_norms``: on steps that reuse a module, run the norm feeding it (where the
    registry knows it feeds nothing else) on one token only.  Outputs are bit-identical either
    way; it saves the norm's elementwise work.

    ``batch_conditioning`` (with ``skip_reused_norms``; blocks whose registry entry names a
    conditioning norm: DiT's, which embed the timestep and class label in every block): on the steps
    that reuse the module such a norm feeds, its conditioning outputs (adaLN shifts, scales, gates)
    are computed for all those steps of a trajectory in one batched call at the first of them, and
    looked up after.  This needs the timesteps the pipeline will pass: it follows the scheduler's
    (applied to a pipeline), and a call whose timestep or class labels differ from the ones
    predicted computes as usual.  Same values as computing them step by step (the same
    operations on more rows; a batched matmul may round the last bit differently: the bundled
    model's images are bit-identical at the benchmarks' batch sizes on the CPU tested).  Under a
    plan that accelerates any step, each block's timestep and label embedding and its adaLN
    projection (registry data ``BlockSpec.conditioning_chain``) are likewise served on every step,
    full-compute steps included, from one batched call per trajectory
    (:mod:`ditaccel.runtime.embed`): a full-compute step then dispatches fewer ops than the plain
    model, whose values it keeps up to that rounding.  A plan that accelerates nothing
    (``plan.full_plan``) stays the plain model's computation bit for bit.

    ``compile``: run the plan compiled by ``torch.compile`` (True, a dict of its options, or a
    :class:`~ditaccel.runtime.program.CompileConfig`; default ``dynamic=False``).  By steps (the
    default, :mod:`ditaccel.runtime.program`): each distinct step pattern of the plan is one
    program, the whole transformer call compiled once (per call shape) and replayed on every step
    of that pattern; everything that depends on the data is decided before the call, so each
    program traces without graph breaks (``fullgraph=True`` holds) and on CUDA
    ``{"mode": "reduce-overhead"}`` captures it as a CUDA graph.  :func:`program_count` bounds
    how many programs a plan has; the full plan (``ditaccel.plan.full_plan``) is one, which
    compiles the unaccelerated model the same way.  By blocks (plans that only route tokens
    through blocks, Shiva's, by default): every block runs through ``torch.compile`` while the
    hooks stay eager, one compiled graph per distinct block input shape shared by all blocks
    (:func:`compile_count` per batch size); a route plan's steps are typically all distinct
    patterns, which whole-step programs would compile one by one.  Dynamo's recompile limit is
    raised to fit either (raise ``torch._dynamo.config.recompile_limit`` yourself to sample at
    many batch sizes).

    ``nan_guard``: if a call's output is not finite, raise
    :class:`~ditaccel.runtime.state.NonFiniteOutput` naming the sampling step and the first
    accelerated module (layer, role) whose output was not, instead of returning a black image.
    It costs one device sync per transformer call.

    ``collapse``: a step on which every module of every block reuses its cache computes the
    blocks as one weighted sum of the cached outputs with this step's gates, in the first block,
    the others passing it through (:mod:`ditaccel.runtime.collapse`; blocks whose registry entry
    says how their output is made: DiT's, PixArt's and SD3's).  The same values as the block-by-block
    path, summed in another order.  A plan with ``gating="cached"`` (each reused output added with
    the gates it was computed with, :class:`~ditaccel.plan.Plan`) runs only on this path: with
    ``collapse=False``, compiled by steps, or on blocks without that registry entry, ``apply``
    raises :class:`PlanMismatch`.

    ``plan`` may also be the path of a plan JSON (``ditaccel plan --out``, :meth:`Plan.save`) or its
    dict.  A plan that records its sampler (SODA's do) is refused on a pipeline whose scheduler is
    of another kind, now or when the scheduler is swapped later.

    Example::

        ditaccel.apply(pipe, ditaccel.make_plan("fora", shape, interval=2))
        images = pipe(class_labels=[0, 7], num_inference_steps=50).images
        ditaccel.remove(pipe)
    """
    plan = as_plan(plan)
    transformer, pipe = _split(target)
    routes = plan.route is not None and bool((plan.route != FULL).any())
    if routes and not callable(router):
        raise PlanMismatch("this plan routes tokens through blocks (plan.route); pass the router "
                           "that scores them: apply(pipe, plan, router=...)")
    compile_options, config = None, CompileConfig.of(compile)
    route_only = routes and not bool((plan.tokens != FULL).any())
    scope = None if config is None else config.scope if config.scope != "auto" else "blocks" if route_only else "steps"
    if scope == "blocks":
        if not route_only:
            raise PlanMismatch("compile scope 'blocks' supports plans that only route tokens through blocks "
                               "(Shiva): caching plans change what a block computes from step to step; "
                               "compile them by steps (CompileConfig(scope='steps'))")
        compile_options = config.torch_options()
        _raise_recompile_limit(4 * compile_count(plan) + 1)  # room for a few batch sizes (each is its own shape)
    blocks = find_blocks(transformer)
    if len(blocks) != plan.num_layers:
        raise PlanMismatch(f"the plan has {plan.num_layers} layers but {type(transformer).__name__} "
                           f"has {len(blocks)} blocks; make the plan for this model")
    fp = plan.meta.get("fingerprint")
    if check_fingerprint and fp is not None and fp != model_fingerprint(transformer):
        raise PlanMismatch("the plan was made for another model (fingerprint differs); "
                           "profile and plan this model, or pass check_fingerprint=False")
    per_block = [block_modules(block, spec) for _, block, spec in blocks]
    missing = sorted({m for mods in per_block for m in plan.modules if m not in mods})
    if missing:
        raise PlanMismatch(f"the plan acts on {missing} but the blocks of "
                           f"{type(transformer).__name__} have only {sorted(per_block[0])}")
    remove(target)

    scheduler = getattr(pipe, "scheduler", None) if pipe is not None else None
    if scheduler is not None:
        state = RunState(plan, source="scheduler")
        state.scheduler = scheduler
        _follow_scheduler(scheduler, state)

        made_for = plan.meta.get("sampler")
        checked = [None]  # the scheduler whose kind was checked against the plan's sampler

        def check():
            # A scheduler swapped in after apply (``pipe.scheduler = ...``) is followed from its
            # first transformer call on: its set_timesteps already ran for this pipeline call.
            if pipe.scheduler is not checked[0]:
                _check_sampler(made_for, pipe.scheduler)
                checked[0] = pipe.scheduler
            if pipe.scheduler is not state.scheduler:
                _unfollow_scheduler(state.scheduler)
                state.scheduler = pipe.scheduler
                _follow_scheduler(pipe.scheduler, state)
                state.begin_trajectory(len(pipe.scheduler.timesteps))
    else:
        state = RunState(plan, source="timestep")
        check = lambda: None  # noqa: E731
    state.nan_guard = nan_guard
    step_hook = StepHook(state, check)
    register(transformer, step_hook, STEP_HOOK)
    if scope == "steps":  # the hooks below follow the programs' patterns; the eager-only ones are left out
        skip_reused_norms = collapse = False
    for layer, ((_, block, spec), mods) in enumerate(zip(blocks, per_block)):
        # in a route plan, a module computed in full at every step needs no module hook (the route
        # hook records what it ran on); elsewhere the module hook also checks the token count
        unhooked = tuple(r for i, r in enumerate(plan.modules)
                         if routes and bool((plan.tokens[:, layer, i] == FULL).all()))
        if routes:
            register(block, RouteHook(state, layer, spec, block, router, compile_options, unhooked), ROUTE_HOOK)
        # (chunked feed-forward splits the MLP input along tokens: it needs all of them)
        norms = spec.norms_of(block) if skip_reused_norms and getattr(block, "_chunk_size", None) is None else {}
        conditioning = spec.conditioning_of(block) if batch_conditioning else None
        # (eager only: compiled code would specialise on the step)
        chain = spec.chain_of(block) if batch_conditioning and scope is None else ()
        if chain and state.source == "scheduler" and any(state.accelerated_list):
            cond_roles = [r for r, n in norms.items() if n == conditioning and r in plan.modules]
            norm_served = [any(state.token_list[s][layer][plan.module_index(r)] == REUSE for r in cond_roles)
                           and not state.anchor_list[s] for s in range(plan.num_steps)]
            for position, module in enumerate(chain):
                register(module, ChainHook(state, layer, position, chain, norm_served), EMBED_HOOK)
        for role, module in mods.items():
            if role in plan.modules and role not in unhooked:
                m = plan.module_index(role)
                register(module, ModuleHook(state, layer, role, m, spec, module), MODULE_HOOK)
                norm = getattr(block, norms[role], None) if role in norms else None
                if norm is not None and bool((plan.tokens[:, layer, m] == REUSE).any()):
                    register(norm, NormSkipHook(state, layer, role, m, norm, conditioning=norms[role] == conditioning),
                             NORM_HOOK)
    program = None
    if collapse:
        from .collapse import COLLAPSE_HOOK, Collapse, CollapseHook, EmbedHook, GateHook

        program = Collapse.build(state, blocks, per_block, NORM_HOOK, batched=batch_conditioning,
                                 transformer=transformer)
        if program is not None:
            state.collapse_steps = program.steps
            for layer, (_, block, spec) in enumerate(blocks):
                register(block, CollapseHook(state, layer, program, block, spec.image_arg, spec.text_arg,
                                             spec.image_output), COLLAPSE_HOOK)
                if program.cached and program.residual.source == "norm":
                    register(getattr(block, program.residual.norm), GateHook(program, layer), COLLAPSE_HOOK)
            if program.residual.embed and batch_conditioning and not program.cached:
                register(getattr(transformer, program.residual.embed), EmbedHook(program), COLLAPSE_HOOK)
    if plan.gating == "cached" and program is None and any(collapsible_steps(plan)):
        remove(transformer)
        raise PlanMismatch("this plan reuses outputs with the gates they were computed with (plan.gating='cached'), "
                           "which only the eager collapsed path runs"
                           + (": apply it without compile" if scope == "steps" else
                              ": apply it with collapse=True" if not collapse else
                              f" and {type(transformer).__name__}'s blocks have no registry Residual form")
                           + ", or use dataclasses.replace(plan, gating='now')")
    if scope == "steps":
        from .program import Programs

        later = plan.tokens[~plan.anchors]                                        # (steps, L, M)
        keep_out = (later != FULL).any(0)
        keep_ref = keep_out & (later > 0).any(0) if plan.token_score == "delta" else keep_out & False
        step_hook.programs = Programs(state, step_hook.fn_ref.original_forward, tuple(plan.modules),
                                      keep_out.tolist(), keep_ref.tolist(), config)
        state.compiled = True
        _raise_recompile_limit(4 * program_count(plan) + 8)
    setattr(transformer, _STATE_ATTR, state)
    return target


def program_count(plan: Plan) -> int:
    """Distinct step patterns of ``plan`` (what ``apply(..., compile=True)`` compiles by steps, per
    guidance layout: each pattern once without and once with forecast histories at most)."""
    rows = {(bool(a), tuple(t.flatten().tolist()) if not a else None,
             None if plan.route is None else tuple(r.tolist()))
            for a, t, r in zip(plan.anchors, plan.tokens,
                               plan.route if plan.route is not None else [None] * plan.num_steps)}
    return len(rows) * (2 if plan.forecast else 1)


def _raise_recompile_limit(needed: int) -> None:
    """Room for ``needed`` more compiled graphs: dynamo counts them per code object (the
    transformer's forward, shared by every plan applied to it in this process) and past its limit
    runs the code uncompiled."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 8) + needed


def _check_sampler(made_for: str | None, scheduler) -> None:
    """Refuse to run a plan made for one sampler (its step-by-step errors were measured there)
    under a scheduler of another kind."""
    from ..pipeline import SAMPLERS

    if made_for not in SAMPLERS:
        return
    kind = SAMPLERS[made_for][0]
    if type(scheduler) is not kind:
        raise PlanMismatch(f"the plan was made for the {made_for} sampler ({kind.__name__}) but the pipeline's "
                           f"scheduler is a {type(scheduler).__name__}; sample with "
                           f"ditaccel.make_scheduler({made_for!r}, pipe.scheduler.config) or plan for this sampler")


def compile_count(plan: Plan) -> int:
    """How many block graphs ``apply(..., compile=True)`` compiles for ``plan``: one per distinct
    token count a block runs on (the full count included), shared by all blocks."""
    route = plan.route if plan.route is not None else torch.full((1, 1), FULL)
    counts = {plan.num_tokens if int(k) == FULL else int(k) for k in route.unique()}
    return len(counts)


def _follow_scheduler(scheduler, state: RunState) -> None:
    """The explicit step context: every pipeline call runs ``scheduler.set_timesteps`` once before
    its loop (a new trajectory) and ``scheduler.step`` once per sampling step.  The wrappers are
    instance attributes over the class's methods; :func:`_unfollow_scheduler` deletes them."""
    set_timesteps, step = scheduler.set_timesteps, scheduler.step

    # functools.wraps keeps the signatures: pipelines inspect set_timesteps' parameters.
    @functools.wraps(set_timesteps)
    def set_timesteps_and_begin(*args, **kwargs):
        out = set_timesteps(*args, **kwargs)
        state.begin_trajectory(len(scheduler.timesteps))
        return out

    @functools.wraps(step)
    def step_and_advance(*args, **kwargs):
        out = step(*args, **kwargs)
        state.advance()
        return out

    set_timesteps_and_begin._ditaccel = step_and_advance._ditaccel = True
    scheduler.set_timesteps, scheduler.step = set_timesteps_and_begin, step_and_advance
    set_begin_index = getattr(scheduler, "set_begin_index", None)
    if set_begin_index is not None:
        # image-to-image pipelines start part-way into the schedule: the step index is the
        # position in the scheduler's timesteps, so the plan's later steps apply
        @functools.wraps(set_begin_index)
        def set_begin_index_and_skip(begin_index: int = 0):
            out = set_begin_index(begin_index)
            state.step = int(begin_index)
            return out

        set_begin_index_and_skip._ditaccel = True
        scheduler.set_begin_index = set_begin_index_and_skip


def _unfollow_scheduler(scheduler) -> None:
    for name in ("set_timesteps", "step", "set_begin_index"):
        if getattr(scheduler.__dict__.get(name), "_ditaccel", False):
            del scheduler.__dict__[name]


def remove(target):
    """Take every ditaccel hook off; the model then computes exactly as before ``apply``.

    Example::

        ditaccel.remove(pipe)  # the pipeline computes exactly as before apply
    """
    transformer, pipe = _split(target)
    state = getattr(transformer, _STATE_ATTR, None)
    if state is not None and state.scheduler is not None:
        _unfollow_scheduler(state.scheduler)
    if pipe is not None and getattr(pipe, "scheduler", None) is not None:
        _unfollow_scheduler(pipe.scheduler)
    unregister(transformer, STEP_HOOK)
    from .collapse import COLLAPSE_HOOK

    for module in transformer.modules():
        unregister(module, COLLAPSE_HOOK)
        unregister(module, MODULE_HOOK)
        unregister(module, ROUTE_HOOK)
        unregister(module, NORM_HOOK)
        unregister(module, EMBED_HOOK)
    if hasattr(transformer, _STATE_ATTR):
        delattr(transformer, _STATE_ATTR)
    return target


def state_of(target) -> RunState | None:
    """The applied plan's run state of a pipeline or transformer (None without a plan): the plan,
    the step and branch of the running call, and one record per transformer call of what it
    computed.

    Example::

        ditaccel.state_of(pipe).records[:2]  # what each transformer call computed
    """
    transformer, _ = _split(target)
    return getattr(transformer, _STATE_ATTR, None)
