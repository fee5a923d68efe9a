"""Per-generation state of an applied plan: which step and CFG branch is running, the module caches,
and the record of what was computed.  Reset at the start of every new sampling trajectory."""

from __future__ import annotations

from dataclasses import dataclass, field
import torch

from ..plan import FULL, Plan


class PlanMismatch(ValueError):
    pass


class NonFiniteOutput(RuntimeError):
    """An accelerated step produced NaN or Inf: raised instead of returning a black image."""


def _into(buf, value):
    """Copy ``value`` (a tensor, or a tuple of tensors / None) into ``buf`` when shapes allow,
    else into fresh buffers.  Persistent buffers keep a trajectory's caches from pinning the
    transient activations the allocator would otherwise reuse."""
    if isinstance(value, tuple):
        bufs = buf if isinstance(buf, tuple) and len(buf) == len(value) else (None,) * len(value)
        return tuple(_into(b, v) for b, v in zip(bufs, value))
    if value is None:
        return None
    if buf is None or buf.shape != value.shape or buf.dtype != value.dtype or buf.device != value.device:
        return value.detach().clone()
    return buf.copy_(value)


def _lerp(a, b, w: float):
    """``a + w * (b - a)`` over a tensor or a tuple of tensors / None (w > 1 extrapolates)."""
    if isinstance(b, tuple):
        return tuple(_lerp(x, y, w) for x, y in zip(a, b))
    return None if b is None else torch.lerp(a, b, w)


def finite_probe(t: torch.Tensor) -> torch.Tensor:
    """One number that is finite where ``t`` is finite: its sum.  fp32, fp64 and bf16 are summed in
    their own dtype (bf16 has fp32's exponent range, and its sum accumulates in fp32), fp16 in fp32
    (a sum of finite fp16 values can pass 65504).  A bf16 tensor summed with ``dtype=torch.float32``
    takes a slow path on a CPU: the guard cost about 4% of a forecasting run in bf16 that way, about
    1% now."""
    return t.sum(dtype=torch.float32) if t.dtype == torch.float16 else t.sum()


def _shapes(value):
    if isinstance(value, tuple):
        return tuple(_shapes(v) for v in value)
    return None if value is None else (tuple(value.shape), value.dtype)


def _versions(value):
    """In-place modification counters of a cached value (None where torch keeps none, e.g.
    inference-mode tensors)."""
    if isinstance(value, tuple):
        return tuple(_versions(v) for v in value)
    if value is None:
        return None
    try:
        return value._version
    except RuntimeError:  # inference tensors track no version
        return None


def _detached(value):
    """``value`` cut from autograd (a tensor that records no graph is kept as it is: a detach is
    one more dispatched op per cached output)."""
    if isinstance(value, tuple):
        return tuple(_detached(v) for v in value)
    return value.detach() if value is not None and value.requires_grad else value


def _has_none(versions, value) -> bool:
    if isinstance(versions, tuple):
        return any(_has_none(v, x) for v, x in zip(versions, value))
    return versions is None and value is not None


class ModuleCache:
    """One module's cache for one guidance branch: its output as last computed or patched, and
    (for the ``delta`` score) its input when each token was last computed.  ``generation`` says
    which trajectory filled them.

    The output is kept by reference, not copied (a copy of every cached output costs several
    percent of an anchor step on a CPU), and its in-place version counters are remembered: if
    anything but the runtime modifies it in place afterwards, :meth:`valid` says so, the module
    recomputes, and from then on this cache copies.  Inputs kept for the ``delta`` score are
    always copied: two modules may share one input tensor (e.g. Flux's single blocks), and the
    runtime patches inputs in place."""

    def __init__(self):
        self.out = None
        self.ref: torch.Tensor | None = None
        self.generation = -1
        self.shape: tuple[int, ...] = ()
        self.copy_out = False
        self._versions = None
        # forecasting: the full output before ``out`` and the steps both were computed at (``out_step``
        # is kept without history too: cached gating reads the gates of that step)
        self.prev = None
        self.prev_step: int | None = None
        self.out_step: int | None = None

    def store(self, out, x: torch.Tensor, keep_ref: bool, generation: int, step: int | None = None,
              history: bool = False) -> None:
        """Keep a full output computed at ``step``; with ``history`` the one it replaces is kept
        too (as ``prev``) for :meth:`forecast`, when it belongs to this trajectory and is intact."""
        spare = None
        if history:
            intact = (self.generation == generation and self.out is not None and _shapes(self.out) == _shapes(out)
                      and (self.copy_out or _versions(self.out) == self._versions))
            spare = self.prev if self.copy_out else None
            if intact:
                self.prev, self.prev_step = self.out, self.out_step
                if self.copy_out:
                    self.out = spare  # recycle the older buffer, never the one now in prev
            else:
                self.prev, self.prev_step = None, None
        if step is not None:
            self.out_step = step
        self.out = _into(self.out, out) if self.copy_out else _detached(out)
        self.ref = _into(self.ref, x) if keep_ref else None
        self.shape, self.generation = tuple(x.shape), generation
        self.touched()
        if not self.copy_out and _has_none(self._versions, self.out):
            self.copy_out = True  # cannot watch it: keep a private copy instead
            self.out = _into(None, out)
            self.touched()

    def give(self):
        """The cached output for the block to use: the cache itself (watched), or in copy mode a
        copy the block may modify."""
        return _into(None, self.out) if self.copy_out else self.out

    def forecast(self, step: int, order: int = 1):
        """The output extrapolated to ``step`` from the last two full outputs (first order, in the
        step index): ``out + (step - a) / (a - b) * (out - prev)``; the cached output itself until
        there are two, or with ``order`` 0.  Always a new tensor."""
        if (not order or self.prev is None or self.out_step is None or self.prev_step is None
                or self.out_step <= self.prev_step):
            return _into(None, self.out)
        w = (step - self.prev_step) / (self.out_step - self.prev_step)
        return _lerp(self.prev, self.out, w)

    def touched(self) -> None:
        """The runtime itself patched the output in place."""
        self._versions = _versions(self.out)

    def valid(self, x: torch.Tensor, generation: int) -> bool:
        if self.generation != generation or self.shape != tuple(x.shape):
            return False
        if not self.copy_out and _versions(self.out) != self._versions:
            # modified behind our back: recompute, and keep private copies from now on
            self.copy_out, self.generation, self.out = True, -1, None
            return False
        return True

    @property
    def image_out(self) -> torch.Tensor:
        return self.out[0] if isinstance(self.out, tuple) else self.out


@dataclass
class CallRecord:
    step: int
    branch: int
    anchor: bool
    # (layer, role) -> tokens computed (N for full, 0 for reuse)
    computed: dict[tuple[int, str], int] = field(default_factory=dict)
    rows: int = 0
    wall_s: float = 0.0
    flops: int | None = None  # counted only when RunState.count_flops is on


class RunState:
    """Which sampling step and guidance branch the transformer is running, the module caches, and
    the record of what was computed.

    The step index comes from an explicit context.  Applied to a pipeline, the context follows the
    pipeline's scheduler: ``set_timesteps`` (called once at the start of every pipeline call)
    starts a new trajectory and clears every cache, ``step`` advances to the next sampling step,
    and the transformer calls in between are the guidance branches of that step (one call for
    pipelines that batch both branches, two for pipelines that call once per branch).  Applied to
    a bare transformer, there is no scheduler to follow, so the context falls back to the
    timestep: sampling timesteps strictly decrease along a trajectory, so a larger one starts a
    new trajectory, a smaller one is the next step, an equal one is another branch of the same
    step.  :meth:`begin_trajectory` / :meth:`advance` drive it by hand."""

    def __init__(self, plan: Plan, source: str = "timestep"):
        if source not in ("scheduler", "timestep"):
            raise ValueError(f"unknown step source {source!r}")
        self.plan = plan
        # the plan as Python lists: a lookup per module call, not an indexing op on a tensor
        self.anchor_list: list[bool] = plan.anchors.tolist()
        self.token_list: list[list[list[int]]] = plan.tokens.tolist()
        self.fill_list: list[list[list[int]]] = plan.fill_grid().tolist()  # forecast order per entry
        # [layer][m]: some step forecasts the module (its cache keeps two full outputs, unpatched)
        self.history_list: list[list[bool]] = plan.keeps_history().tolist()
        self.route_list: list[list[int]] | None = None if plan.route is None else plan.route.tolist()
        # the steps on which the plan computes anything differently from the plain model
        self.accelerated_list: list[bool] = [not a or (self.route_list is not None and any(k != FULL for k in r))
                                             for a, r in zip(self.anchor_list, self.route_list or self.anchor_list)]
        self.source = source
        self.scheduler = None  # the scheduler the context follows (source "scheduler")
        self.call_kwargs: dict = {}  # the running transformer call's keyword arguments
        self.call_memo: dict = {}  # facts about the running call, found once (see on_schedule)
        self.cfg_paired = False  # its batch is two guidance branches of the same latents
        self.routed_tokens: int | None = None  # set while a routed block runs
        self.skipped_inputs: set[tuple[int, str]] = set()  # (layer, role) whose norm was skipped
        self.count_flops = False
        # the running step program's context (runtime.program), None on the eager path; whether
        # the plan runs as compiled step programs at all
        self.program = None
        self.compiled = False
        self.collapsed = False  # this call's blocks were collapsed into the first one's output
        self.collapse_steps: list[bool] | None = None  # the steps apply() collapses, if any
        # NaN guard: every accelerated module output is checked on the device (no sync), the
        # transformer output once per call; the first non-finite one is named in the error
        self.nan_guard = True
        # ([(layer, role), ...], finite flags (or a function computing them): one per name) per
        # watched output or group of outputs
        self.finite_checks: list[tuple[list[tuple[int, str]], torch.Tensor]] = []
        self.reset()

    def reset(self) -> None:
        """Forget the trajectory: every cache becomes invalid (its buffers are kept for reuse)."""
        self.step, self.branch, self.last_t = -1, -1, None
        self.skipped_inputs = set()
        # (layer, branch) -> the block's conditioning for this trajectory's reusing steps, batched
        # (hooks.ConditioningTable), or None where it cannot be predicted
        self.conditioning: dict[tuple[int, int], object] = {}
        # (layer, branch, the block runs its chain) -> the block's conditioning chain outputs for
        # this trajectory's steps (embed.ChainTable), or False where they cannot be predicted
        self.embed_tables: dict[tuple[int, int], object] = {}
        self.trajectory_memo: dict = {}  # facts about this trajectory, found once (see timesteps_at)
        self.generation = getattr(self, "generation", -1) + 1
        if not hasattr(self, "caches"):
            self.caches: dict[tuple[int, int, str], ModuleCache] = {}
        self.records: list[CallRecord] = []

    def begin_trajectory(self, num_steps: int | None = None) -> None:
        """A new sampling trajectory starts: clear every cache; the next call is step 0."""
        if num_steps is not None and num_steps != self.plan.num_steps:
            raise PlanMismatch(f"the plan is for {self.plan.num_steps} sampling steps but the "
                               f"scheduler runs {num_steps}; make the plan for {num_steps} steps "
                               f"or sample with {self.plan.num_steps}")
        self.reset()
        self.step = 0

    def advance(self) -> None:
        """The sampler finished a step: the next transformer call belongs to the next step."""
        if self.step >= 0:
            self.step += 1
            self.branch = -1

    def begin_call(self, timestep, rows: int) -> CallRecord:
        if self.source == "timestep":
            self._follow_timestep(timestep)
        elif self.step < 0:
            raise PlanMismatch("the transformer was called outside a sampling trajectory of its "
                               "pipeline (the scheduler's set_timesteps was not called); apply "
                               "the plan to the transformer itself to drive it by hand")
        self.branch += 1
        self.collapsed = False
        self.skipped_inputs.clear()
        self.finite_checks = []
        self.call_memo = {}
        if self.step >= self.plan.num_steps:
            raise PlanMismatch(f"the sampler ran more than the plan's {self.plan.num_steps} "
                               "steps; make the plan for the step count you sample with")
        record = CallRecord(self.step, self.branch, self.is_anchor, rows=rows)
        self.records.append(record)
        return record

    def _follow_timestep(self, timestep) -> None:
        if timestep is None:
            raise PlanMismatch("the transformer was called without a timestep; ditaccel needs it "
                               "to know the sampling step when applied to a bare transformer")
        t = float(timestep.reshape(-1)[0]) if torch.is_tensor(timestep) else float(timestep)
        if self.last_t is None or t > self.last_t:
            self.begin_trajectory()
        elif t < self.last_t:
            self.advance()
        self.last_t = t

    def watch(self, layer: int, role: str, out):
        """Keep an accelerated module's output to check, should this call's transformer output
        not be finite, whether it was the first non-finite one (one sum of it then: NaN and Inf
        carry through a sum); nothing is computed while the outputs are finite.  The output is
        checked as it is at the end of the call (the runtime changes cached outputs in place only
        on later steps)."""
        if self.nan_guard:
            t = out[0] if isinstance(out, tuple) else out
            if torch.is_tensor(t) and t.is_floating_point():
                self.finite_checks.append(([(layer, role)], lambda: torch.isfinite(finite_probe(t))))
        return out

    def watch_lazily(self, slots: list[tuple[int, str]], flags) -> None:
        """:meth:`watch` for the outputs of many modules at once, computed only if the
        transformer output turns out not finite: ``flags()`` gives one flag per (layer, role) of
        ``slots``, in order."""
        if self.nan_guard:
            self.finite_checks.append((slots, flags))

    def check_finite(self, out) -> None:
        """After a transformer call: raise :class:`NonFiniteOutput` naming the step and the first
        accelerated module whose output was not finite."""
        if not self.nan_guard:
            return
        t = getattr(out, "sample", None)
        if t is None:
            t = out[0] if isinstance(out, (tuple, list)) else out
        if not torch.is_tensor(t) or bool(torch.isfinite(t).all()):
            return
        step = f"sampling step {self.step} of {self.plan.num_steps}"
        for names, ok in self.finite_checks:
            ok = ok() if callable(ok) else ok
            if not bool(ok.all()):
                layer, role = names[int((~ok.reshape(-1)).nonzero()[0])]
                raise NonFiniteOutput(
                    f"{step}: layer {layer} ({role}) produced NaN/Inf on an accelerated step; plan a "
                    "smaller speedup for this model, or run it in fp32 (disable the check: "
                    "apply(..., nan_guard=False))")
        where = "a full-compute step" if self.is_anchor else "an accelerated step"
        if self.compiled and not self.is_anchor:  # programs record no per-module checks
            raise NonFiniteOutput(
                f"{step}: the transformer output has NaN/Inf on an accelerated step of a compiled plan; "
                "apply it without compile to name the module, plan a smaller speedup, or run in fp32")
        raise NonFiniteOutput(
            f"{step}: the transformer output has NaN/Inf on {where} and no accelerated module "
            "produced them; the model itself overflows here (try fp32), not the plan")

    def timesteps_at(self, steps: list[int], like: torch.Tensor) -> torch.Tensor:
        """The followed scheduler's timesteps at ``steps``, each repeated for every row of ``like``
        (a call's 1-D timestep) in its dtype and device, step-major: what the pipeline passes at
        those steps, concatenated (found once per trajectory)."""
        key = ("timesteps", tuple(steps), like.shape[0], like.dtype, like.device)
        out = self.trajectory_memo.get(key)
        if out is None:
            at = self.scheduler.timesteps.to(like)[torch.tensor(steps, device=like.device)]
            out = self.trajectory_memo[key] = at[:, None].expand(len(steps), like.shape[0]).reshape(-1)
        return out

    def on_schedule(self, t) -> bool:
        """Whether ``t`` is the followed scheduler's timestep of this step in every row (found
        once per transformer call)."""
        key = ("on_schedule", id(t))
        ok = self.call_memo.get(key)
        if ok is None:
            sched = getattr(self.scheduler, "timesteps", None)
            ok = (torch.is_tensor(t) and torch.is_tensor(sched) and len(sched) == self.plan.num_steps
                  and 0 <= self.step < len(sched) and torch.equal(t, sched[self.step].to(t).expand_as(t)))
            self.call_memo[key] = ok
        return ok

    @property
    def is_anchor(self) -> bool:
        return self.anchor_list[self.step]

    def tokens_for(self, layer: int, module_index: int) -> int:
        return FULL if self.anchor_list[self.step] else self.token_list[self.step][layer][module_index]
