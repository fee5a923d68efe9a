"""Step programs: a plan's steps run as compiled programs, one per distinct step pattern.

A plan is static: what every block of a step does (compute, reuse, forecast, recompute ``k``
tokens, route ``k`` tokens) is known before sampling starts.  Steps that do the same thing run
the same program: the transformer's forward with the hooks following that pattern, compiled once
by ``torch.compile`` and replayed on every step that shares it (on CUDA with
``mode="reduce-overhead"``: captured as a CUDA graph).  Everything that depends on the data or on
the step index is decided on the host before the call: which cached outputs exist, the forecast
weights, whether the batch pairs two guidance branches; the program itself never waits for the
device and reads nothing but its pattern (a Python constant), the call's arguments and the cached
outputs it is given (graph inputs).  A cache-only step's program is then the conditioning, the
gates and one fused sum per block: the compiler drops the norms and modulations whose outputs the
reused modules ignore.

Caches live in a :class:`Bank` (per guidance branch: a module's last full or patched output, the
one before for forecasts, its input for the ``delta`` token score), committed after each call from
what the program returned through its context.

This is the runtime's second executor: the hooks (``runtime.hooks``) run it when
``RunState.program`` is set, and run their eager path otherwise; both compute the same values.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..plan import FULL, REUSE


@dataclass(frozen=True)
class ModuleAction:
    """What one module does in one step program.

    ``tokens``: FULL, REUSE or the number of image tokens recomputed; ``forecast``: its reused
    output is the first-order forecast from the last two full ones (index into the call's
    forecast weights, -1: none); ``store``: keep its full output for later steps; ``ref``: keep
    its input (the ``delta`` score's reference) as patched or computed here; ``patch``: a partial
    recompute's output becomes the cache (not where the module forecasts: its cache keeps full
    outputs)."""
    tokens: int
    forecast: int = -1
    store: bool = False
    ref: bool = False
    patch: bool = False


@dataclass(frozen=True)
class StepProgram:
    """One step pattern: per layer, per module of the plan, a :class:`ModuleAction`; per layer the
    routed token count (None: no routing); the bank entries the program reads (names
    ``"<layer>.<role>"``, ``+":prev"``, ``+":ref"``)."""
    modules: tuple[tuple[ModuleAction, ...], ...]
    route: tuple[int, ...] | None
    reads: tuple[str, ...]
    cfg_paired: bool = False

    def computed(self, roles: tuple[str, ...], num_tokens: int) -> dict[tuple[int, str], int]:
        """(layer, role) -> image tokens computed, as the eager path records them."""
        out = {}
        for layer, actions in enumerate(self.modules):
            routed = self.route is not None and self.route[layer] != FULL
            for role, a in zip(roles, actions):
                out[(layer, role)] = (self.route[layer] if routed else
                                      num_tokens if a.tokens == FULL else a.tokens)
        return out


def slot_name(layer: int, role: str) -> str:
    return f"{layer}.{role}"


@dataclass
class BankEntry:
    out: object = None        # a tensor or a tuple of tensors / None
    prev: object = None
    out_step: int | None = None
    prev_step: int | None = None
    ref: torch.Tensor | None = None


@dataclass
class ProgramContext:
    """What a running program reads and writes.  One object per applied plan, its fields set before
    each call (a new object per call would be a new guard for the compiler every time)."""
    program: StepProgram | None = None
    bank: dict = field(default_factory=dict)        # name -> tensor (or tuple): the cached inputs
    weights: torch.Tensor | None = None             # forecast weights, in ModuleAction.forecast order
    new: dict = field(default_factory=dict)         # name -> tensor: what the call stores


@dataclass(frozen=True)
class CompileConfig:
    """How ``apply(..., compile=...)`` compiles a plan.

    ``scope``: "steps" (the transformer call of each distinct step pattern is one program,
    compiled whole), "blocks" (each block's own forward is compiled and shared by all blocks,
    the hooks stay eager; for plans that only route tokens through blocks) or "auto" (blocks for
    such route-only plans, whose step patterns are typically all distinct; steps otherwise).
    ``options``: keyword arguments of ``torch.compile`` (default ``dynamic=False``; e.g.
    ``{"mode": "reduce-overhead"}`` to capture CUDA graphs, ``{"backend": "eager",
    "fullgraph": True}`` to check a plan's programs trace without graph breaks).

    ``copy_caches``: keep private copies of the outputs a program stores for later steps (None:
    where the programs are CUDA graphs, ``mode="reduce-overhead"`` or ``backend="cudagraphs"``, whose
    outputs live in memory the next replay of the same graph overwrites).

    Example::

        ditaccel.apply(pipe, plan, compile=CompileConfig(options={"mode": "reduce-overhead"}))
    """
    scope: str = "auto"
    options: dict = field(default_factory=dict)
    copy_caches: bool | None = None

    def __post_init__(self):
        if self.scope not in ("auto", "steps", "blocks"):
            raise ValueError(f"compile scope must be 'auto', 'steps' or 'blocks', got {self.scope!r}")

    @classmethod
    def of(cls, value) -> "CompileConfig | None":
        """``apply``'s ``compile=`` argument as a config: False/None -> None, True -> defaults, a dict
        -> ``torch.compile`` options (its ``scope`` key, if any, the scope)."""
        if value is None or value is False:
            return None
        if value is True:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            options = dict(value)
            return cls(scope=options.pop("scope", "auto"), options=options)
        raise TypeError(f"compile must be a bool, a dict of torch.compile options or a CompileConfig, "
                        f"got {type(value).__name__}")

    def torch_options(self) -> dict:
        return {"dynamic": False, **self.options}

    @property
    def cuda_graphs(self) -> bool:
        """Whether the compiled programs are CUDA graphs (on a CUDA device)."""
        return self.options.get("mode") in ("reduce-overhead", "max-autotune") or self.options.get("backend") == "cudagraphs"

    @property
    def copies(self) -> bool:
        return self.cuda_graphs if self.copy_caches is None else bool(self.copy_caches)


class Programs:
    """The host side of step programs for one applied plan: choosing the program of each call,
    the bank of cached outputs, and the compiled transformer forward."""

    def __init__(self, state, forward, roles: tuple[str, ...], keep_out, keep_ref, config: CompileConfig):
        self.state, self.roles = state, roles
        self.copies, self.cuda_graphs = config.copies, config.cuda_graphs
        self.keep_out, self.keep_ref = keep_out, keep_ref    # [layer][m]: later steps read it
        # [layer][m]: some step forecasts it (its bank keeps two full outputs, never patched)
        self.history = state.history_list
        self.ctx = ProgramContext()
        self.programs: dict[tuple, StepProgram] = {}
        self.banks: dict[int, dict[str, BankEntry]] = {}     # branch -> name -> entry
        self._generation, self._signature = None, None
        # (program, call signature) pairs run so far: each is one graph the compiler made
        self.variants: set[tuple[int, tuple]] = set()
        self.eager, self.forward = forward, torch.compile(forward, **config.torch_options())

    # -- choosing ---------------------------------------------------------------------------------
    def program_for(self, bank: dict[str, BankEntry]) -> tuple[StepProgram, list[float]]:
        """This call's program (shared with every call of the same pattern) and its forecast weights."""
        st, plan = self.state, self.state.plan
        step = st.step
        anchor = st.anchor_list[step]
        route = None if st.route_list is None else tuple(st.route_list[step])
        layers, weights, reads = [], [], []
        for layer in range(plan.num_layers):
            row = []
            routed = route is not None and route[layer] != FULL
            for m, role in enumerate(self.roles):
                name = slot_name(layer, role)
                k = FULL if anchor or routed else st.token_list[step][layer][m]
                entry = bank.get(name)
                if k != FULL and (entry is None or entry.out is None):
                    k = FULL  # nothing cached yet (e.g. a pipeline starting part way): compute
                forecast = -1
                if k != FULL:
                    reads.append(name)
                    history = (st.fill_list[step][layer][m] and self.keep_out[layer][m] and entry.prev is not None
                               and entry.out_step is not None and entry.prev_step is not None
                               and entry.out_step > entry.prev_step)
                    if history:
                        forecast = len(weights)
                        weights.append((step - entry.prev_step) / (entry.out_step - entry.prev_step))
                        reads.append(name + ":prev")
                    if k != REUSE and entry.ref is not None:
                        reads.append(name + ":ref")
                store = not routed and k == FULL and self.keep_out[layer][m]
                ref = not routed and self.keep_ref[layer][m] and k != REUSE
                patch = k > 0 and not self.history[layer][m]
                row.append(ModuleAction(int(k), forecast, bool(store), bool(ref), bool(patch)))
            layers.append(tuple(row))
        key = (tuple(layers), route, tuple(reads), bool(st.cfg_paired and route is not None))
        program = self.programs.get(key)
        if program is None:
            program = self.programs[key] = StepProgram(*key)
        return program, weights

    # -- running ----------------------------------------------------------------------------------
    def call(self, args, kwargs):
        st = self.state
        signature = _signature(args, kwargs)
        if self._generation != st.generation or self._signature != signature:
            self.banks = {}  # a new trajectory, or another batch / image size: nothing is reusable
            self._generation, self._signature = st.generation, signature
        bank = self.banks.setdefault(st.branch, {})
        program, weights = self.program_for(bank)
        self.variants.add((id(program), signature))
        ctx = self.ctx
        ctx.program = program
        ctx.bank = {name: _read(bank, name) for name in program.reads}
        ctx.weights = torch.tensor(weights, dtype=torch.float32) if weights else None
        ctx.new = {}
        st.program = ctx
        if self.cuda_graphs:  # the bank holds copies: earlier replays' outputs may be overwritten
            torch.compiler.cudagraph_mark_step_begin()
        try:
            out = self.forward(*args, **kwargs)
        except torch._dynamo.exc.Unsupported as e:
            # an exception raised while the program is traced (a check of ours: a plan for another
            # image size) reaches here wrapped by the compiler; the same call run eagerly raises it
            # as it is, the one line the eager path gives
            if not isinstance(e.__cause__, torch._dynamo.exc.ObservedException):
                raise
            self.eager(*args, **kwargs)
            raise
        finally:
            st.program = None
        self._commit(bank, program, ctx.new)
        ctx.bank, ctx.new, ctx.weights = {}, {}, None  # hold no tensors between calls
        st.records[-1].computed.update(program.computed(self.roles, st.plan.num_tokens))
        return out

    def _commit(self, bank: dict[str, BankEntry], program: StepProgram, new: dict) -> None:
        st = self.state
        if self.copies:
            new = {name: _copy(value) for name, value in new.items()}
        for layer, actions in enumerate(program.modules):
            for m, (role, a) in enumerate(zip(self.roles, actions)):
                name = slot_name(layer, role)
                if name in new:
                    entry = bank.setdefault(name, BankEntry())
                    if a.tokens == FULL:  # a full output: the one it replaces becomes the history
                        if self.history[layer][m] and entry.out is not None:
                            entry.prev, entry.prev_step = entry.out, entry.out_step
                        entry.out_step = st.step
                    entry.out = new[name]
                if name + ":ref" in new:
                    bank.setdefault(name, BankEntry()).ref = new[name + ":ref"]


def _copy(value):
    if isinstance(value, tuple):
        return tuple(_copy(v) for v in value)
    return None if value is None else value.clone()


def _read(bank: dict[str, BankEntry], name: str):
    base, _, part = name.partition(":")
    entry = bank[base]
    return {"": entry.out, "prev": entry.prev, "ref": entry.ref}[part]


def _signature(args, kwargs) -> tuple:
    """Shapes and dtypes of a call's tensor arguments: a cached output belongs to calls like it."""
    def sig(v):
        return (tuple(v.shape), v.dtype, v.device) if torch.is_tensor(v) else None
    return tuple(sig(a) for a in args) + tuple((k, sig(v)) for k, v in sorted(kwargs.items()))


def forecast_of(ctx: ProgramContext, name: str, action: ModuleAction):
    """Inside a program: a reused module's output (its forecast where it has one)."""
    out = ctx.bank[name]
    if action.forecast < 0:
        return out
    prev, w = ctx.bank[name + ":prev"], ctx.weights[action.forecast]
    return _lerp(prev, out, w)


def _lerp(a, b, w: torch.Tensor):
    if isinstance(b, tuple):
        return tuple(_lerp(x, y, w) for x, y in zip(a, b))
    if b is None:
        return None
    return torch.lerp(a.float(), b.float(), w).to(b.dtype)
