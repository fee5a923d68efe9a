"""What to compute at every sampling step: the contract between planners and the runtime.

A :class:`Plan` is data.  Planners (SODA, FORA, ToCa-style, Shiva) are pure functions that return
one; the runtime hooks only execute it.  For ``T`` steps, ``L`` transformer blocks and the modules
``M`` a block has (``attn``, ``cross``, ``mlp``):

- ``anchors[t]``: step ``t`` computes everything (and refreshes every cache).
- ``tokens[t, l, m]``: on the other steps, per module, ``FULL`` (-1) computes all tokens,
  ``REUSE`` (0) returns the cached output, ``k`` in ``1..N-1`` recomputes the ``k`` tokens with the
  highest ``token_score`` and takes the others from the cache.
- ``route[t, l]`` (optional, the Shiva operation): ``FULL`` or ``k`` in ``1..N-1``: the whole block
  runs on exactly ``k`` routed tokens and the others skip it on the identity path.
- ``forecast``: what a token that is not recomputed gets.  0: the module's output as last
  computed (plain reuse).  1: the first-order extrapolation of the module's last two full outputs
  in the step index, ``y_a + (t - a) / (a - b) * (y_a - y_b)`` for full computes at steps
  ``b < a < t`` (as TaylorSeer does; plain reuse until a module has two).
- ``fill[t, l, m]`` (optional): the same per (step, layer, module), for plans that choose the
  filler per segment (SODA); ``forecast`` is then the highest order it holds.
- ``gating``: which gates a reused (or forecast) output is added to the residual stream with, on
  the steps where every block reuses (collapsed steps, ``runtime.collapse``).  ``"now"``: this
  step's adaLN gates (the block's own forward does this).  ``"cached"``: the gates of the step
  each output was computed at, so that the block's whole gated contribution is what is reused or
  extrapolated (on some models, e.g. SD3-style ones, this stays closer to the full model; SODA's
  calibration measures both).

Token counts are fixed per (step, layer, module), so every tensor shape is known ahead of time.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import io

MODULES = ("attn", "cross", "mlp")
TOKEN_SCORES = ("delta", "feature_mean")
FORECAST_ORDERS = (0, 1)
GATINGS = ("now", "cached")
FULL, REUSE = -1, 0
KIND = "plan"


class PlanError(ValueError):
    pass


def check_forecast(value) -> int:
    """``value`` if it is a forecast order (0 reuse, 1 first-order), else a one-line ValueError."""
    if type(value) is not int or value not in FORECAST_ORDERS:
        raise ValueError(f"forecast must be one of {FORECAST_ORDERS} (0: reuse the last output, 1: "
                         f"first-order forecast from the last two), got {value!r}")
    return value


def check_schedule(method: str, interval, forecast) -> None:
    """The options every interval planner shares (FORA, ToCa, Δ-DiT): ``interval`` an integer >= 1
    and ``forecast`` a forecast order, else a one-line ValueError naming ``method``."""
    check_forecast(forecast)
    if not isinstance(interval, int) or isinstance(interval, bool) or interval < 1:
        raise ValueError(f"{method} interval must be an integer >= 1, got {interval!r}")


@dataclass(frozen=True, eq=False)
class Plan:
    num_tokens: int
    modules: tuple[str, ...]
    anchors: torch.Tensor            # (T,) bool
    tokens: torch.Tensor             # (T, L, M) int32: FULL, REUSE or k
    route: torch.Tensor | None = None  # (T, L) int32: FULL or k
    token_score: str = "delta"
    method: str = "custom"
    meta: dict[str, Any] = field(default_factory=dict)
    forecast: int = 0                # 0: reuse the last output; 1: extrapolate the last two
    fill: torch.Tensor | None = None  # (T, L, M) int32 forecast order per entry; None: ``forecast``
    gating: str = "now"              # collapsed steps: "now" (this step's gates) or "cached"

    def __post_init__(self):
        object.__setattr__(self, "modules", tuple(self.modules))
        object.__setattr__(self, "anchors", torch.as_tensor(self.anchors, dtype=torch.bool).clone())
        object.__setattr__(self, "tokens", torch.as_tensor(self.tokens, dtype=torch.int32).clone())
        if self.route is not None:
            object.__setattr__(self, "route", torch.as_tensor(self.route, dtype=torch.int32).clone())
        if self.fill is not None:
            fill = torch.as_tensor(self.fill, dtype=torch.int32).clone()
            object.__setattr__(self, "fill", fill)
            if fill.shape == self.tokens.shape and fill.numel() and type(self.forecast) is int:
                object.__setattr__(self, "forecast", int(fill.max()))
        self.validate()

    def fill_grid(self) -> torch.Tensor:
        """(T, L, M) forecast order of every entry (``fill``, or ``forecast`` everywhere)."""
        return self.fill.clone() if self.fill is not None else torch.full_like(self.tokens, self.forecast)

    def keeps_history(self) -> torch.Tensor:
        """(L, M) bool: the modules some step forecasts (their caches keep two full outputs)."""
        return (self.fill_grid()[~self.anchors] > 0).any(0)

    # -- shape -------------------------------------------------------------------------------
    @property
    def num_steps(self) -> int:
        return int(self.anchors.shape[0])

    @property
    def num_layers(self) -> int:
        return int(self.tokens.shape[1])

    def validate(self) -> None:
        n = self.num_tokens
        if not isinstance(n, int) or n < 2:
            raise PlanError(f"num_tokens must be an integer >= 2, got {n!r}")
        bad = [m for m in self.modules if m not in MODULES]
        if bad or not self.modules or len(set(self.modules)) != len(self.modules):
            raise PlanError(f"modules must be distinct names from {MODULES}, got {self.modules}")
        try:
            check_forecast(self.forecast)
        except ValueError as e:
            raise PlanError(str(e)) from None
        if self.gating not in GATINGS:
            raise PlanError(f"gating must be one of {GATINGS}, got {self.gating!r}")
        if self.token_score not in TOKEN_SCORES:
            raise PlanError(f"unknown token_score {self.token_score!r}; choose one of {TOKEN_SCORES}")
        if self.anchors.ndim != 1 or self.anchors.numel() == 0:
            raise PlanError("anchors must be a non-empty 1-d list, one entry per sampling step")
        t = self.num_steps
        if self.tokens.ndim != 3 or self.tokens.shape[0] != t or self.tokens.shape[2] != len(self.modules):
            raise PlanError(f"tokens must have shape (steps={t}, layers, modules={len(self.modules)}), "
                            f"got {tuple(self.tokens.shape)}")
        if self.num_layers < 1:
            raise PlanError("a plan needs at least one layer")
        if self.fill is not None:
            if tuple(self.fill.shape) != tuple(self.tokens.shape):
                raise PlanError(f"fill must have the shape of tokens {tuple(self.tokens.shape)}, "
                                f"got {tuple(self.fill.shape)}")
            bad = sorted(set(self.fill.unique().tolist()) - set(FORECAST_ORDERS))
            if bad:
                raise PlanError(f"fill holds forecast orders from {FORECAST_ORDERS}, found {bad}")
        if not bool(self.anchors[0]):
            raise PlanError("step 0 must be an anchor: there is nothing cached before it")
        k = self.tokens
        if ((k < FULL) | (k >= n)).any():
            raise PlanError(f"token counts must be -1 (full), 0 (reuse) or 1..{n - 1}; "
                            f"found values in [{int(k.min())}, {int(k.max())}]")
        if (k[self.anchors] != FULL).any():
            raise PlanError("anchor steps compute every module in full (token count -1)")
        if self.route is not None:
            r = self.route
            if tuple(r.shape) != (t, self.num_layers):
                raise PlanError(f"route must have shape (steps={t}, layers={self.num_layers}), "
                                f"got {tuple(r.shape)}")
            if ((r != FULL) & ((r < 1) | (r >= n))).any():
                raise PlanError(f"routed token counts must be -1 (all) or 1..{n - 1}")
            mixed = (r != FULL) & (k != FULL).any(-1)
            if mixed.any():
                s, layer = (int(v) for v in mixed.nonzero()[0])
                raise PlanError(f"step {s}, layer {layer} both routes tokens and reuses module "
                                "outputs; a routed block computes its modules in full")

    # -- helpers -------------------------------------------------------------------------------
    def module_index(self, name: str) -> int:
        return self.modules.index(name)

    def computed_fraction(self) -> torch.Tensor:
        """(T, L, M) fraction of tokens each module computes (1 full, 0 reused)."""
        k = self.tokens.float()
        frac = torch.where(self.tokens == FULL, torch.ones_like(k), k / self.num_tokens)
        if self.route is not None:
            r = self.route.float()
            rf = torch.where(self.route == FULL, torch.ones_like(r), r / self.num_tokens)
            frac = frac * rf[..., None]
        return frac

    def pruned_modules(self) -> int:
        """How many (step, layer, module) entries recompute a subset of the tokens."""
        return int(((self.tokens > 0) & (self.tokens < self.num_tokens)).sum())

    def tag(self) -> str:
        """Short name for files and logs, e.g. ``fora-T50-a17``."""
        return (f"{self.method}-T{self.num_steps}-a{int(self.anchors.sum())}" + ("-f1" if self.forecast else "")
                + ("-gc" if self.gating == "cached" else ""))

    def __eq__(self, other) -> bool:
        if not isinstance(other, Plan):
            return NotImplemented
        same_route = (self.route is None and other.route is None) or (
            self.route is not None and other.route is not None and torch.equal(self.route, other.route))
        return (self.num_tokens == other.num_tokens and self.modules == other.modules
                and torch.equal(self.anchors, other.anchors) and torch.equal(self.tokens, other.tokens)
                and same_route and self.token_score == other.token_score and self.forecast == other.forecast
                and torch.equal(self.fill_grid(), other.fill_grid()) and self.gating == other.gating
                and self.method == other.method and self.meta == other.meta)

    # -- JSON ----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": io.SCHEMA_VERSION, "kind": KIND, "method": self.method,
                "num_tokens": self.num_tokens, "modules": list(self.modules),
                "token_score": self.token_score, "anchors": self.anchors.tolist(),
                "tokens": self.tokens.tolist(),
                "route": None if self.route is None else self.route.tolist(), "forecast": self.forecast,
                **({} if self.fill is None else {"fill": self.fill.tolist()}),
                **({} if self.gating == "now" else {"gating": self.gating}), "meta": self.meta}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Plan":
        if not isinstance(d, dict) or d.get("kind") != KIND:
            raise PlanError("not a ditaccel plan (kind != 'plan'); pass a file written by "
                            "`ditaccel plan` or Plan.save")
        if d.get("schema_version") != io.SCHEMA_VERSION:
            raise PlanError(f"plan schema version {d.get('schema_version')} is not "
                            f"{io.SCHEMA_VERSION}; regenerate the plan with this ditaccel")
        meta = d.get("meta")
        if not isinstance(meta, dict):
            raise PlanError("plan is missing the field 'meta' (or it is not an object): it records the model "
                            "and sampler the plan was made for; regenerate the plan")
        if d.get("method") in PROFILED_METHODS and not {"fingerprint", "sampler"} <= meta.keys():
            raise PlanError(f"plan meta is missing the model fingerprint or sampler a {d['method']} plan records; "
                            "regenerate the plan")
        for name, bools in (("anchors", True), ("tokens", False), ("route", False), ("fill", False)):
            if name in d and d[name] is not None:
                _check_grid(d[name], name, bools)
        for name in ("num_tokens", "forecast"):
            if name in d and (type(d[name]) is not int):
                raise PlanError(f"plan field {name!r} must be an integer, got {d[name]!r}; regenerate it")
        try:
            return cls(num_tokens=d["num_tokens"], modules=tuple(d["modules"]),
                       anchors=d["anchors"], tokens=d["tokens"], route=d.get("route"),
                       token_score=d.get("token_score", "delta"), method=d.get("method", "custom"),
                       meta=dict(meta), forecast=d.get("forecast", 0), fill=d.get("fill"),
                       gating=d.get("gating", "now"))
        except PlanError:
            raise
        except KeyError as e:
            raise PlanError(f"plan is missing the field {e.args[0]!r}; regenerate it") from None
        except (TypeError, ValueError, RuntimeError) as e:
            raise PlanError(f"plan fields have the wrong type or ragged shape ({e}); regenerate it") from None

    def save(self, path: str | Path) -> None:
        io.write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        return cls.from_dict(io.read_json(path))

    def to_json(self) -> str:
        return json.dumps(io.strict_json(self.to_dict()), allow_nan=False)


# methods whose plans are made from a model's profile, so record its fingerprint and sampler
PROFILED_METHODS = ("soda", "soda-cache")


def _check_grid(value, name: str, bools: bool) -> None:
    """A plan's nested list ``value`` holds only integers (or booleans where ``bools``): a value
    such as 20.5 or "3" is refused, not truncated."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, list):
            stack.extend(v)
        elif not (type(v) is int or (bools and type(v) is bool)):
            kind = "booleans" if bools else "integers"
            raise PlanError(f"plan field {name!r} must hold {kind}, found {v!r}; regenerate the plan")


def full_plan(num_steps: int, num_layers: int, num_tokens: int,
              modules: tuple[str, ...] = ("attn", "mlp")) -> Plan:
    """Every step an anchor: executes exactly like no plan at all.

    Example::

        plan = full_plan(50, shape.num_layers, shape.num_tokens, shape.modules)
        ditaccel.apply(pipe, plan, compile=True)  # the plain model, compiled
    """
    return Plan(num_tokens=num_tokens, modules=modules, anchors=torch.ones(num_steps, dtype=torch.bool),
                tokens=torch.full((num_steps, num_layers, len(modules)), FULL), method="full")
