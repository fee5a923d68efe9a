"""SODA's planner (Sensitivity-Oriented Dynamic Acceleration; CVPR 2026, arXiv 2603.07057), planned
from a :class:`~ditaccel.profiling.Profile`.  Pure functions: profile + config -> Plan.

- DCS: the anchor steps by dynamic programming, the cost of a segment being the summed error of
  the steps that fill in from its anchor, with the filler the plan will run there
  (:func:`segment_costs`, :func:`dp_schedule`): plain reuse, or the first-order forecast from the
  segment's anchor and the one before it (its error depends on the gap between the two, so the
  program's state is the last segment's length).  With ``forecast=None`` the filler is chosen per
  segment and (layer, module), whichever the profile measured lower (``Plan.fill``).
- UAS: on non-anchor steps, per (layer, module), recompute the fraction
  ``rho = clip(lam * E_c / mean(E_c) + beta, 0, rho_max)`` of tokens (snapped down to the profiled
  ratios whose measured time is below the full module's, :func:`partial_pays`) where that beats
  plain reuse (``E_p < (1 - margin) * E_c``), else reuse.  ``beta`` is solved by bisection so the
  plan meets the budget; a FLOP budget charges a partial action its measured time's share of the
  full module's FLOPs where that is more than its own (:func:`charged_flops`).
- With a speedup budget, every feasible anchor count is tried and the plan with the lowest
  predicted error is kept.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import torch

from ...plan import FORECAST_ORDERS, FULL, GATINGS, REUSE, TOKEN_SCORES, Plan, check_forecast


WEIGHTINGS = ("none", "sensitivity", "structure")
PRICINGS = ("filler", "reuse")


class BudgetUnreachable(ValueError):
    """No plan meets the budget with the profiled cache ages: the budget is beyond what the
    profile lets SODA reach."""

    def __init__(self):
        super().__init__("no plan meets this budget with the profiled cache ages; profile longer intervals "
                         "or ask for a smaller speedup")


@dataclass(frozen=True)
class Config:
    speedup: float | None = None          # target FLOP speedup
    latency_speedup: float | None = None  # target wall-clock speedup: of the latency model (measured
                                          # module costs), or measured by calibrate_soda(timed=...)
    anchors: int | None = None            # a fixed number of anchor steps
    prune: bool = True                    # UAS; False: caching only (OFS+DCS)
    schedule: str = "dp"                  # "dp" (DCS) or "uniform" (evenly spaced anchors)
    spread: float | None = None           # dp: anchors at most ceil(spread * steps / anchors) apart
    token_score: str | None = None        # default: the profile's first token score
    lam: float = 0.5                      # slope of rho in E_c / mean(E_c)
    rho_max: float = 0.5
    margin: float = 0.0
    forecast: int | None = None           # 0 reuse, 1 first-order forecast (Plan.forecast); None:
                                          # per segment and module, whichever the profile measures
                                          # lower (reuse where it has no forecast errors)
    weighting: str = "none"               # dp: "none", segment cost = summed module errors;
                                          # "sensitivity", the images' error they predict
                                          # (step_weights; needs a profile with step_sensitivity);
                                          # "structure", the same in 1 - SSIM (step_structure)
    gating: str | None = None             # Plan.gating of collapsed steps: "now" or "cached"; None:
                                          # "now" (calibrate_soda measures both)
    pricing: str = "filler"               # dp: what a segment costs, "filler", the error of the
                                          # filler the plan runs there; "reuse", plain reuse's
                                          # whatever the filler (calibrate_soda measures both
                                          # on its unweighted DPs, the reuse-priced ones forecasting)

    def __post_init__(self):
        budgets = [b for b in (self.speedup, self.latency_speedup) if b is not None]
        if len(budgets) > 1:
            raise ValueError("give at most one of speedup / latency_speedup")
        if not budgets and self.anchors is None:
            raise ValueError("give a budget: speedup, latency_speedup or anchors")
        if any(not (1.0 < b < math.inf) for b in budgets):  # (NaN fails too)
            raise ValueError(f"a target speedup must be a finite number > 1, got {budgets[0]}")
        if self.anchors is not None and (isinstance(self.anchors, bool) or self.anchors != int(self.anchors)
                                         or self.anchors < 1):
            raise ValueError(f"anchors must be an integer >= 1, got {self.anchors}")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {self.weighting!r}")
        if self.pricing not in PRICINGS:
            raise ValueError(f"pricing must be one of {PRICINGS}, got {self.pricing!r}")
        if self.schedule not in ("dp", "uniform"):
            raise ValueError(f"schedule must be 'dp' or 'uniform', got {self.schedule!r}")
        if self.spread is not None and not 1.0 <= self.spread < math.inf:
            raise ValueError(f"spread must be >= 1 (1 = as even as possible), got {self.spread}")
        if self.token_score is not None and self.token_score not in TOKEN_SCORES:
            raise ValueError(f"unknown token score {self.token_score!r}; choose one of {TOKEN_SCORES}")
        if self.forecast is not None:
            check_forecast(self.forecast)
        if self.gating is not None and self.gating not in GATINGS:
            raise ValueError(f"gating must be one of {GATINGS}, got {self.gating!r}")
        if not (0 < self.rho_max < 1 and 0 <= self.lam < math.inf and 0 <= self.margin < 1):
            raise ValueError(f"need 0 < rho_max < 1, 0 <= lam < inf and 0 <= margin < 1, got rho_max "
                             f"{self.rho_max}, lam {self.lam}, margin {self.margin}")

    def tag(self) -> str:
        target = (f"x{self.speedup:g}" if self.speedup else f"lat{self.latency_speedup:g}"
                  if self.latency_speedup else f"a{self.anchors}")
        parts = ["soda" if self.prune else "soda-cache", self.schedule if self.schedule != "dp" else None,
                 f"s{self.spread:g}" if self.spread and self.schedule == "dp" else None,
                 {"sensitivity": "w", "structure": "ws"}.get(self.weighting) if self.schedule == "dp" else None,
                 "rp" if self.pricing == "reuse" and self.schedule == "dp" else None,
                 f"f{self.forecast}" if self.forecast else None, "gc" if self.gating == "cached" else None, target]
        return "-".join(p for p in parts if p)


# ------------------------------------------------------------------------------------------------
# DCS: the dynamic program


def segment_costs(e_cache: torch.Tensor, max_len: int, e_forecast: torch.Tensor | None = None,
                  forecast: int | None = 0, weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Cost of an anchor at step ``a`` filling the next ``n - 1`` steps when the anchor before it
    was ``g`` steps earlier (``g = 0``: none), and the filler choice behind it.

    ``e_cache``: (T, L, M, ages) plain-reuse errors, ages 1..A; ``e_forecast``: (T, L, M, ages,
    gaps) first-order forecast errors, gaps 1..G (None: reuse only); ``forecast``: 0 reuse, 1
    forecast wherever there are two anchors, None whichever is lower per (layer, module).
    Returns ``cost`` (T, max_len + 1, G + 1), the summed error over the segment's steps and
    (layer, module) (inf where a segment is impossible), and ``use`` (T, max_len + 1, G + 1, L, M)
    bool, where the segment forecasts.  With ``weights`` (T,): the images' error the segment
    predicts instead, ``(sum_t sqrt(weights[t] * e_t))^2`` over its filled steps ``t`` (``e_t``:
    the step's summed module errors): the steps one anchor fills in err alike and add up
    coherently, segments independently."""
    t_steps, n_layers, n_mods, ages = e_cache.shape
    reuse = e_cache.double().nan_to_num(nan=math.inf)                     # (T, L, M, A)
    fc = None if e_forecast is None or forecast == 0 else e_forecast.double().nan_to_num(nan=math.inf)
    n_gaps = 0 if fc is None else min(fc.shape[-1], max_len)
    cost = torch.full((t_steps, max_len + 1, n_gaps + 1), math.inf, dtype=torch.float64)
    use = torch.zeros((t_steps, max_len + 1, n_gaps + 1, n_layers, n_mods), dtype=torch.bool)
    w = None if weights is None else weights.double()

    def weighted(per_step: list[torch.Tensor], steps: list[int]) -> torch.Tensor:
        """(sum_t sqrt(w_t * e_t))^2 over the steps' summed errors ``per_step`` (each (...))."""
        amp = sum(((w[t] * e).clamp_min(0).sqrt() for e, t in zip(per_step, steps)), torch.zeros(()))
        return torch.as_tensor(amp, dtype=torch.float64) ** 2

    for a in range(t_steps):
        r_sum = torch.zeros(n_layers, n_mods, dtype=torch.float64)
        f_sum = torch.zeros(n_layers, n_mods, n_gaps, dtype=torch.float64)
        r_steps, f_steps, steps = [], [], []
        for n in range(1, max_len + 1):
            if n > 1:
                j = n - 1
                if a + j >= t_steps or j > ages:
                    break
                r_sum = r_sum + reuse[a + j, :, :, j - 1]
                r_steps.append(reuse[a + j, :, :, j - 1])
                steps.append(a + j)
                if fc is not None:
                    f_sum = f_sum + fc[a + j, :, :, j - 1, :n_gaps]
                    f_steps.append(fc[a + j, :, :, j - 1, :n_gaps].permute(2, 0, 1))  # (G, L, M)
            if a + n > t_steps:
                break
            cost[a, n, 0] = float(r_sum.sum()) if w is None else float(weighted([r.sum() for r in r_steps], steps))
            if fc is not None:
                f = f_sum.permute(2, 0, 1)                                    # (G, L, M)
                better = f < r_sum if forecast is None else torch.ones_like(f, dtype=torch.bool)
                better &= torch.isfinite(f) | ~torch.isfinite(r_sum)
                chosen = torch.where(better, f, r_sum)
                cost[a, n, 1:] = chosen.sum((1, 2)) if w is None else weighted(
                    [torch.where(better, fs, r).sum((1, 2)) for fs, r in zip(f_steps, r_steps)], steps)
                use[a, n, 1:] = better
    return cost, use


def step_weights(profile, weighting: str = "sensitivity") -> torch.Tensor:
    """(T,) what a unit of summed module error at step t costs in the images: the profile's
    measured sensitivity of the images to the step (``weighting`` "sensitivity": in squared pixel
    error, ``step_sensitivity``; "structure": in 1 - SSIM, ``step_structure``; interpolated
    log-linearly between the measured steps, held beyond them) over the step's summed module error
    at age 1 under the filler the plans run: the first-order forecast averaged over the profiled
    gaps where the profile has ``e_forecast``, plain reuse where not (held at a thousandth of its
    median at least).  Raises ValueError where the profile has no such sensitivity.

    Example::

        w = step_weights(profile, "structure")   # the DP's weights under Config(weighting="structure")
    """
    if weighting not in WEIGHTINGS[1:]:
        raise ValueError(f"weighting must be one of {WEIGHTINGS[1:]}, got {weighting!r}")
    sens = profile.step_sensitivity if weighting == "sensitivity" else profile.step_structure
    if sens is None or not bool(torch.isfinite(sens).any()):
        raise ValueError(f"this profile has no step {weighting}: make it again with `ditaccel profile` "
                         "(sensitivity steps > 0) or plan with weighting='none'")
    t_steps = profile.num_steps
    known = torch.nonzero(torch.isfinite(sens) & (sens > 0)).flatten()
    if len(known) == 0:
        return torch.zeros(t_steps, dtype=torch.float64)
    logs = sens[known].double().log()
    x = torch.arange(t_steps, dtype=torch.float64)
    i = torch.bucketize(x, known.double()).clamp(1, max(1, len(known) - 1))
    if len(known) == 1:
        interp = logs[0].expand(t_steps)
    else:
        x0, x1 = known[i - 1].double(), known[i].double()
        y0, y1 = logs[i - 1], logs[i]
        frac = ((x - x0) / (x1 - x0)).clamp(0, 1)
        interp = y0 + frac * (y1 - y0)
    e1 = profile.e_cache[:, :, :, 0].double().nan_to_num(nan=0.0).sum((1, 2))
    if profile.e_forecast is not None:  # the filler the plans run: a forecast, averaged over its gaps
        ef = profile.e_forecast[:, :, :, 0].double()
        ef = ef.nan_to_num(nan=0.0).sum(-1) / torch.isfinite(ef).sum(-1).clamp_min(1)
        ef = ef.sum((1, 2))
        e1 = torch.where(ef > 0, ef, e1)
    floor = 1e-3 * float(e1[e1 > 0].median()) if bool((e1 > 0).any()) else 1.0
    return interp.exp() / e1.clamp_min(floor)


class Schedules:
    """The DP of DCS over every anchor count at once: ``dp[t, g, k]``, the least cost of steps
    ``t..T-1`` with ``k`` anchors, one at ``t`` whose previous anchor was ``g`` steps earlier
    (``dp[t, g, k] = min_n cost[t, n, g] + dp[t + n, n, k - 1]``), vectorised over ``g`` and
    ``k``.  :meth:`anchors` reads a schedule off for any count."""

    def __init__(self, cost: torch.Tensor):
        if cost.ndim == 2:
            cost = cost[:, :, None]
        t_steps, max_len, n_g = cost.shape[0], cost.shape[1] - 1, cost.shape[2]
        self.cost, self.t_steps, self.max_len, self.n_g = cost, t_steps, max_len, n_g
        inf = math.inf
        dp = torch.full((t_steps + 1, n_g, t_steps + 1), inf, dtype=torch.float64)
        dp[t_steps, :, 0] = 0.0
        choice = torch.zeros((t_steps, n_g, t_steps + 1), dtype=torch.long)
        pad = torch.full((1,), inf, dtype=torch.float64)
        for t in range(t_steps - 1, -1, -1):
            best = torch.full((n_g, t_steps + 1), inf, dtype=torch.float64)
            arg = torch.zeros((n_g, t_steps + 1), dtype=torch.long)
            for n in range(1, min(max_len, t_steps - t) + 1):
                nxt = torch.cat([pad, dp[t + n, min(n, n_g - 1), :-1]])        # k anchors: k - 1 after
                v = cost[t, n][:, None] + nxt[None, :]
                better = v < best
                best = torch.where(better, v, best)
                arg = torch.where(better, torch.full_like(arg, n), arg)
            dp[t], choice[t] = best, arg
        self.dp, self.choice = dp, choice

    def anchors(self, num_anchors: int) -> tuple[torch.Tensor, float, list[tuple[int, int, int]]]:
        """(anchors (T,) bool, summed cost, segments ``(a, n, g)``) with exactly ``num_anchors``
        anchors, step 0 always one."""
        if not 1 <= num_anchors <= self.t_steps:
            raise ValueError(f"need 1..{self.t_steps} anchors, got {num_anchors}")
        total = float(self.dp[0, 0, num_anchors])
        if total == math.inf:
            raise ValueError(f"{num_anchors} anchors cannot cover {self.t_steps} steps with segments of at "
                             f"most {self.max_len} steps")
        anchors = torch.zeros(self.t_steps, dtype=torch.bool)
        segments = []
        t, g, k = 0, 0, num_anchors
        while t < self.t_steps:
            n = int(self.choice[t, g, k])
            anchors[t] = True
            segments.append((t, n, g))
            t, g, k = t + n, min(n, self.n_g - 1), k - 1
        return anchors, total, segments


def dp_schedule(cost: torch.Tensor, num_anchors: int) -> tuple[torch.Tensor, float]:
    """Anchor steps (T,) bool minimising the summed segment cost (``cost``: (T, max_len + 1) or,
    with the previous gap, (T, max_len + 1, G + 1)) with exactly ``num_anchors`` anchors, step 0
    always one."""
    anchors, total, _ = Schedules(cost).anchors(num_anchors)
    return anchors, total


def segments_of(anchors: torch.Tensor) -> list[tuple[int, int, int]]:
    """The segments ``(a, n, g)`` of an anchor schedule: anchor ``a`` covers ``n`` steps, the
    anchor before it ``g`` steps earlier (0 for the first)."""
    idx = torch.nonzero(anchors).flatten().tolist() + [len(anchors)]
    return [(a, b - a, a - idx[i - 1] if i else 0) for i, (a, b) in enumerate(zip(idx, idx[1:]))]


def fill_of(anchors: torch.Tensor, use: torch.Tensor, n_layers: int, n_mods: int) -> torch.Tensor:
    """(T, L, M) forecast order per entry: 1 on the steps of a segment that forecasts there."""
    fill = torch.zeros(len(anchors), n_layers, n_mods, dtype=torch.int32)
    if use.shape[2] <= 1:
        return fill
    for a, n, g in segments_of(anchors):
        if g and n > 1:
            fill[a + 1:a + n] = use[a, n, min(g, use.shape[2] - 1)].to(torch.int32)
    return fill


def uniform_schedule(num_steps: int, num_anchors: int) -> torch.Tensor:
    anchors = torch.zeros(num_steps, dtype=torch.bool)
    anchors[torch.linspace(0, num_steps, num_anchors + 1)[:-1].floor().long()] = True
    return anchors


def gaps_of(anchors: torch.Tensor) -> torch.Tensor:
    """(T,) steps between the last anchor and the one before it (0 where there is none)."""
    gaps = torch.zeros(len(anchors), dtype=torch.long)
    for a, n, g in segments_of(anchors):
        gaps[a:a + n] = g
    return gaps


def filler_errors(profile, anchors: torch.Tensor, fill: torch.Tensor | None) -> torch.Tensor:
    """(T, L, M) the profile's error of each entry filled in rather than computed: the forecast's
    where ``fill`` says so and the entry has two anchors behind it, plain reuse's elsewhere (0 on
    anchors, inf beyond the profiled ages or gaps)."""
    t_steps, n_layers, n_mods, n_ages = profile.e_cache.shape
    ages, gaps = ages_of(anchors), gaps_of(anchors)
    out = torch.zeros(t_steps, n_layers, n_mods, dtype=torch.float64)
    for t in range(t_steps):
        j, g = int(ages[t]), int(gaps[t])
        if j == 0:
            continue
        if j > n_ages:
            out[t] = math.inf
            continue
        err = profile.e_cache[t, :, :, j - 1].double()
        if fill is not None and g and profile.e_forecast is not None and bool(fill[t].any()):
            fc = profile.e_forecast[t, :, :, j - 1, g - 1].double() if g <= profile.e_forecast.shape[-1] \
                else torch.full_like(err, math.inf)
            err = torch.where(fill[t] > 0, fc, err)
        out[t] = err.nan_to_num(nan=math.inf)
    return out


def ages_of(anchors: torch.Tensor) -> torch.Tensor:
    """(T,) steps since the last anchor (0 on anchors)."""
    ages, last = torch.zeros(len(anchors), dtype=torch.long), 0
    for t, a in enumerate(anchors.tolist()):
        last = t if a else last
        ages[t] = t - last
    return ages


# ------------------------------------------------------------------------------------------------
# Cost and error of a plan, predicted from the profile


def _ratio_index(profile, tokens: torch.Tensor) -> torch.Tensor:
    """Index into the profile's cost tables (ratios..., full) for token counts (FULL / k)."""
    ks = torch.tensor([profile.tokens_for_ratio(r) for r in profile.ratios])
    idx = torch.full_like(tokens, len(ks), dtype=torch.long)
    for i, k in enumerate(ks.tolist()):
        idx[tokens == k] = i
    return idx


def partial_pays(profile) -> torch.Tensor:
    """(M, R) bool: where recomputing the profiled fraction of a module's tokens takes less
    measured time than computing all of them (``profile.module_ms``, on the profiling device).
    Only there does UAS offer a partial action: elsewhere it would cost more time than the full
    module for a worse result."""
    ms = profile.module_ms.double()                       # (M, R + 1)
    return ms[:, :-1] < ms[:, -1:]


def charged_flops(profile) -> torch.Tensor:
    """(L, M, R + 1) the FLOPs a plan's budget is charged per module call: its own FLOPs, or, if
    more, the full module's FLOPs scaled by the measured time of that token count (a partial
    action is priced by the time it takes, not only by the FLOPs it skips)."""
    mf = profile.module_flops.double()                    # (L, M, R + 1)
    ms = profile.module_ms.double()
    full_ms = ms[:, -1:]
    scale = torch.where(full_ms > 0, ms / full_ms.clamp_min(1e-30), torch.ones_like(ms))  # (M, R + 1)
    return torch.maximum(mf, mf[..., -1:] * scale[None])


def _forecast_ms(plan: Plan, profile, reuse: torch.Tensor) -> float:
    """What forecasting costs beyond reusing (ms at the profile's timing batch): on each filled
    step after the second anchor (before it, a forecast has one output to read and reuses), the
    profile's ``forecast_ms - reuse_ms`` at the share of the step's modules that forecast
    (``reuse``: (non-anchor steps, L, M) which entries reuse); 0 where the profile did not
    measure it."""
    extra = getattr(profile, "forecast_ms", None)
    if extra is None or not plan.forecast:
        return 0.0
    extra -= profile.reuse_ms
    non = ~plan.anchors.bool()
    history = plan.anchors.long().cumsum(0)[non] >= 2                                     # (n,)
    forecasting = reuse & (plan.fill_grid()[non] > 0) & history[:, None, None]            # (n, L, M)
    return float(forecasting.flatten(1).double().mean(1).sum()) * extra


def predict(plan: Plan, profile, base: torch.Tensor | None = None) -> dict[str, float]:
    """FLOPs (per sample), latency (ms per call at the profile's timing batch) and summed error
    that the profile predicts for ``plan`` (``base``: its :func:`filler_errors`, if known).
    ``charged_flops`` is what a FLOP budget is charged (:func:`charged_flops`: partial actions at
    their measured time's share of the full module's FLOPs, if above their own; a reusing step on
    which any module computes, the profile's ``decollapse_ms`` at its share of a full step).  The
    latency counts a forecasting step's extra time over a reusing one (``Profile.forecast_ms``);
    the FLOP budget does not, as FORA's forecasting plans' FLOPs do not: at a FLOP budget the two
    compare like for like."""
    t_steps = plan.num_steps
    non = ~plan.anchors.bool()                            # (T,)
    n_non = int(non.sum())
    tok = plan.tokens[non].long()                         # (n, L, M)
    ridx = _ratio_index(profile, tok)
    mf = profile.module_flops.double()                    # (L, M, R + 1)
    cf = charged_flops(profile)
    ms = profile.module_ms.double()                       # (M, R + 1)
    rest_flops = profile.step_flops - float(mf[..., -1].sum())
    n_anchor = t_steps - n_non
    if base is None:
        base = filler_errors(profile, plan.anchors, plan.fill_grid())
    reuse = tok == REUSE
    computed = ~reuse
    layer = torch.arange(tok.shape[1])[None, :, None].expand_as(tok)
    mod = torch.arange(tok.shape[2])[None, None, :].expand_as(tok)
    # a reusing step on which any module computes runs block by block: it pays the profile's
    # decollapse_ms once, charged to a FLOP budget at its share of a full step's time
    apart = int(computed.flatten(1).any(1).sum()) if computed.numel() else 0
    overhead_ms = profile.decollapse_ms
    overhead_flops = profile.step_flops * overhead_ms / profile.step_ms if profile.step_ms > 0 else 0.0
    # a collapsed reusing step may compute less than the blocks' own forwards would (SD3: no text
    # stream): the profile counts it where it could
    collapsed_flops = getattr(profile, "reuse_flops", None)
    collapsed_flops = rest_flops if collapsed_flops is None else collapsed_flops
    skipped = (n_non - apart) * collapsed_flops + apart * rest_flops
    flops = n_anchor * profile.step_flops + skipped + float(mf[layer, mod, ridx][computed].sum())
    charged = (n_anchor * profile.step_flops + skipped + float(cf[layer, mod, ridx][computed].sum())
               + apart * overhead_flops)
    latency = (n_anchor * profile.step_ms + n_non * profile.reuse_ms + float(ms[mod, ridx][computed].sum())
               + apart * overhead_ms + _forecast_ms(plan, profile, reuse))
    per_step = torch.zeros(t_steps, dtype=torch.float64)                # summed error per step
    per_step[non] = torch.where(reuse, base[non].double(), torch.zeros((), dtype=torch.float64)).sum((1, 2))
    partial = computed & (tok != FULL)
    if bool(partial.any()):
        score = profile.token_scores.index(plan.token_score) if plan.token_score in profile.token_scores else 0
        ages = ages_of(plan.anchors)[non]                 # (n,), >= 1
        n_ages = profile.e_prune.shape[3]
        idx = torch.nonzero(partial)                      # (P, 3): step (among non-anchors), layer, module
        j = ages[idx[:, 0]]
        steps = torch.nonzero(non).flatten()[idx[:, 0]]
        v = profile.e_prune[steps, idx[:, 1], idx[:, 2], (j - 1).clamp_max(n_ages - 1), ridx[partial], score]
        # beyond the profiled cache ages, or never measured: unaffordable
        per_step.index_add_(0, steps, torch.where(j <= n_ages, v.double().nan_to_num(nan=math.inf), math.inf))
    full_flops, full_ms = t_steps * profile.step_flops, t_steps * profile.step_ms
    out = {"flops": flops, "speedup_flops": full_flops / flops, "charged_flops": charged,
           "latency_ms": latency, "speedup_latency": full_ms / latency, "error": float(per_step.sum())}
    if profile.step_sensitivity is not None:  # the images' error, as weighting predicts it
        amp = (step_weights(profile) * per_step).sqrt()
        out["image_error"] = float(sum(float(amp[a + 1:a + n].sum()) ** 2 for a, n, _ in segments_of(plan.anchors)))
    return out


# ------------------------------------------------------------------------------------------------
# UAS and the search


def _prune_tokens(profile, anchors: torch.Tensor, beta: float, cfg: Config, score: int,
                  base: torch.Tensor) -> torch.Tensor:
    """The token counts of the UAS rule at ``beta`` on these anchors (``base``: what filling in
    costs per entry, :func:`filler_errors`)."""
    t_steps, n_layers, n_mods = profile.e_cache.shape[:3]
    tokens = torch.full((t_steps, n_layers, n_mods), FULL, dtype=torch.int32)
    ages = ages_of(anchors)
    non = ~anchors
    if not non.any():
        return tokens
    t_idx = torch.nonzero(non).flatten()
    j_idx = ages[t_idx] - 1
    e_c = base[t_idx]  # (n, L, M): what filling in costs
    tokens[t_idx] = REUSE
    if not cfg.prune:
        return tokens
    mean = float(e_c[torch.isfinite(e_c)].mean()) if torch.isfinite(e_c).any() else 1.0
    rho = (cfg.lam * e_c / max(mean, 1e-12) + beta).clamp(0, cfg.rho_max)
    ratios = torch.tensor(profile.ratios, dtype=torch.float64)
    # snap down to the profiled ratios that save time over the full module (below the smallest
    # one: no recompute)
    ri = torch.bucketize(rho, ratios, right=True) - 1                       # (n, L, M), -1 = none
    pays = partial_pays(profile)                                            # (M, R)
    idx = torch.arange(len(profile.ratios))
    last_ok = torch.where(pays, idx, torch.full_like(idx, -1)).cummax(dim=1).values  # (M, R)
    ri = torch.where(ri >= 0, last_ok[torch.arange(n_mods), ri.clamp_min(0)], ri)
    e_p = profile.e_prune[t_idx, :, :, j_idx][..., score].double()  # (n, L, M, R)
    chosen = e_p.gather(-1, ri.clamp_min(0)[..., None]).squeeze(-1)
    use = (ri >= 0) & (chosen < (1 - cfg.margin) * e_c)
    ks = torch.tensor([profile.tokens_for_ratio(r) for r in profile.ratios], dtype=torch.int32)
    vals = torch.where(use, ks[ri.clamp_min(0)], torch.tensor(REUSE, dtype=torch.int32))
    tokens[t_idx] = vals.to(torch.int32)
    return tokens


def _cost(pred: dict, cfg: Config) -> float:
    return pred["latency_ms"] if cfg.latency_speedup else pred["charged_flops"]


def plan(config: Config, profile) -> Plan:
    """The SODA plan for ``profile`` under ``config``'s budget."""
    cfg = config
    t_steps = profile.num_steps
    if cfg.anchors is not None and cfg.anchors > t_steps:
        raise ValueError(f"anchors must be at most the profile's {t_steps} sampling steps, got {cfg.anchors}")
    score_name = cfg.token_score or profile.token_scores[0]
    if score_name not in profile.token_scores:
        raise ValueError(f"the profile has no prune errors for the {score_name!r} score; profile "
                         f"with it or choose one of {profile.token_scores}")
    score = profile.token_scores.index(score_name)
    max_len = max(profile.intervals) + 1
    weights = step_weights(profile, cfg.weighting) if cfg.weighting != "none" and cfg.schedule == "dp" else None
    cost, use = segment_costs(profile.e_cache, max_len, profile.e_forecast, cfg.forecast, weights)
    if cfg.pricing == "reuse":  # the anchors priced by plain reuse (the cost with no anchor before
        cost = cost[:, :, :1]     # the segment's, g = 0); the filler (use) as above
    tables: dict[int, Schedules] = {}
    full_flops, full_ms = t_steps * profile.step_flops, t_steps * profile.step_ms
    target = None
    if cfg.speedup:
        target = full_flops / cfg.speedup
    elif cfg.latency_speedup:
        target = full_ms / cfg.latency_speedup

    def schedule(k: int) -> torch.Tensor:
        if cfg.schedule == "uniform":
            return uniform_schedule(t_steps, k)
        limit = max_len
        bound = math.inf if cfg.spread is None else cfg.spread * t_steps / k
        if bound < max_len:  # no gap longer than spread x the even one (a longer bound: no limit)
            limit = min(max_len, max(math.ceil(bound), math.ceil(t_steps / k)))
        if limit not in tables:
            tables[limit] = Schedules(cost[:, :limit + 1])
        return tables[limit].anchors(k)[0]

    def fill_for(anchors) -> torch.Tensor | None:
        """The per-entry filler of a schedule (None: ``cfg.forecast`` everywhere)."""
        if cfg.forecast is not None:
            return None
        fill = fill_of(anchors, use, profile.num_layers, len(profile.modules))
        return fill if bool(fill.any()) else None

    bases: dict[bytes, torch.Tensor] = {}

    def base_of(anchors, fill) -> torch.Tensor:
        """:func:`filler_errors` of a schedule and its filler, found once per plan() call."""
        key = anchors.numpy().tobytes() + (b"" if fill is None else fill.numpy().tobytes())
        if key not in bases:
            bases[key] = filler_errors(profile, anchors, fill if fill is not None
                                       else torch.full((t_steps, profile.num_layers, len(profile.modules)),
                                                       cfg.forecast or 0, dtype=torch.int32))
        return bases[key]

    def make(anchors, tokens, extra, fill=None) -> Plan:
        p = Plan(num_tokens=profile.num_tokens, modules=profile.modules, anchors=anchors, tokens=tokens,
                 token_score=score_name, method="soda" if cfg.prune else "soda-cache", forecast=cfg.forecast or 0,
                 fill=fill, gating=cfg.gating or "now")
        meta = {"config": asdict(cfg), "predicted": predict(p, profile, base_of(anchors, fill)),
                "fingerprint": profile.meta.get("fingerprint"), "sampler": profile.meta.get("sampler"), **extra}
        return replace(p, meta=meta)

    min_k = math.ceil(t_steps / max_len)
    candidates = [cfg.anchors] if cfg.anchors is not None else range(max(1, min_k), t_steps + 1)
    best = None
    for k in candidates:
        try:
            anchors = schedule(k)
        except ValueError:
            continue
        if cfg.schedule == "uniform" and int(ages_of(anchors).max()) > max_len - 1:
            continue
        fill = fill_for(anchors)
        if target is None:  # anchors only: the rule with beta = 0
            tokens = _prune_tokens(profile, anchors, 0.0, cfg, score, base_of(anchors, fill))
            return make(anchors, tokens, {"anchors": k, "beta": 0.0}, fill)
        base = make(anchors, _prune_tokens(profile, anchors, -math.inf, cfg, score, base_of(anchors, fill)), {}, fill)
        if _cost(base.meta["predicted"], cfg) > target * (1 + 1e-9):
            if cfg.anchors is not None:
                raise ValueError(f"{k} anchors alone cost more than the budget allows; use fewer "
                                 "anchors or a smaller speedup")
            break  # more anchors only cost more
        beta = _solve_beta(profile, anchors, cfg, score, target, make, fill, base_of(anchors, fill)) if cfg.prune else -math.inf
        chosen = make(anchors, _prune_tokens(profile, anchors, beta, cfg, score, base_of(anchors, fill)),
                      {"anchors": k, "beta": beta if math.isfinite(beta) else None}, fill)
        if best is None or chosen.meta["predicted"]["error"] < best.meta["predicted"]["error"]:
            best = chosen
    if best is None:
        raise BudgetUnreachable()
    return best


def _solve_beta(profile, anchors, cfg: Config, score: int, target: float, make, fill, base) -> float:
    """The largest beta whose plan stays within the budget (bisection; cost grows with beta)."""
    lo, hi = -cfg.lam * 50 - cfg.rho_max, cfg.rho_max

    def fits(beta):
        p = make(anchors, _prune_tokens(profile, anchors, beta, cfg, score, base), {}, fill)
        return _cost(p.meta["predicted"], cfg) <= target * (1 + 1e-9)

    if fits(hi):
        return hi
    if not fits(lo):
        return -math.inf
    for _ in range(30):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def plan_soda(profile, **options) -> Plan:
    """``plan_soda(profile, speedup=2.5)``: the SODA plan; options are :class:`Config`'s.

    Example::

        plan = ditaccel.plan_soda(profile, speedup=2.5)          # or latency_speedup=..., anchors=...
    """
    return plan(Config(**options), profile)


# ------------------------------------------------------------------------------------------------
# Candidates and measured selection
#
# The planner's error model adds per-(layer, module) cosine errors measured on the full model's
# trajectory.  It ranks anchor schedules well, but on the bundled model it over-values token
# pruning against extra anchors: modules of a block interact (a fresh MLP on top of a cached
# attention output is worse than caching both), which a per-module table cannot see.  So the
# trade-off between "more anchors" and "fewer anchors + pruning" is decided by measurement:
# :func:`candidates` lists the plans that spend the same budget differently (pure), and
# :func:`calibrate` runs them on a few samples and keeps the one closest to the full model.


def candidates(config: Config, profile, fewer: int = 3) -> list[Plan]:
    """Plans meeting ``config``'s budget that spend it differently: caching only (OFS+DCS) with
    the most anchors the budget affords, then SODA with that many anchors and with up to ``fewer``
    fewer, pruning paying for the rest.  Duplicates (pruning that finds nothing worth it) are
    dropped.  Needs a speedup or latency budget."""
    if config.speedup is None and config.latency_speedup is None:
        raise ValueError("candidates need a speedup or latency_speedup budget")
    if fewer < 0:
        raise ValueError(f"fewer must be >= 0, got {fewer}")
    cache_only = plan(Config(**{**asdict(config), "prune": False, "anchors": None}), profile)
    out = [cache_only]
    if config.prune:
        k_max = int(cache_only.anchors.sum())
        for k in range(k_max, max(0, k_max - fewer - 1), -1):
            try:
                p = plan(Config(**{**asdict(config), "anchors": k}), profile)
            except ValueError:
                continue
            if not any(torch.equal(p.anchors, q.anchors) and torch.equal(p.tokens, q.tokens) for q in out):
                out.append(p)
    return out


SPREADS = (1.0, 1.5, 2.0, None)  # the most even first: the order calibration prefers them in


def preference(schedule: str, weighting: str, pricing: str = "filler") -> int:
    """Where calibration lists a caching-only schedule of this kind (lower: earlier, so kept among
    candidates the samples cannot tell apart): unweighted DPs priced by their filler 0, unweighted
    DPs priced by plain reuse 1, sensitivity-weighted DPs (free schedules) 2, evenly spaced 3.
    :func:`schedules` lists its plans in this order.

    Example::

        preference("dp", "structure")   # 2: after every unweighted DP, before "uniform"
    """
    if schedule != "dp":
        return 3
    return 2 if weighting != "none" else int(pricing == "reuse")


def schedules(config: Config, profile, spreads=SPREADS, forecasts=FORECAST_ORDERS,
              uniform: bool = True) -> list[Plan]:
    """Caching-only plans for ``config``'s budget, one per anchor schedule and filler (duplicates
    dropped, the first kept), in the order calibration prefers them (:func:`preference`): the DP
    schedule for each of ``spreads`` in turn (held to gaps of at most ``spread`` x the even gap;
    None: free), then, where the profile measured forecast errors, the DP schedule for each spread
    priced by plain reuse's errors and run forecasting everywhere (``pricing="reuse"``: the error
    model adds module errors that interact, and on the bundled models the anchors it places for
    reuse can run closer to the full model with the forecast than those it places for it), then
    the sensitivity-weighted DPs (:func:`step_weights`, free), in pixel error and then in
    structure, where the profile measured them (``config.weighting`` other than "none": every DP
    schedule weighted so), then
    (``uniform``) evenly spaced anchors (only those when ``config.schedule`` is "uniform"); each
    with the highest order in ``forecasts`` everywhere, then the filler chosen per segment and
    module (where the profile has forecast errors), then the lower orders (``config.forecast``
    alone when set; a reuse-priced schedule: the highest order alone).

    Example::

        plans = schedules(Config(speedup=2.0), profile)   # calibrate_soda's first round
    """
    out = []
    orders = sorted(forecasts, reverse=True) if config.forecast is None else [config.forecast]
    if config.forecast is None and profile.e_forecast is not None:
        orders = [*orders[:1], None, *orders[1:]]
    pricing = config.pricing
    if config.weighting != "none":
        dps = [("dp", sp, config.weighting, pricing) for sp in spreads]
    else:  # with the weighted DPs (free), where the profile measured the images' sensitivity
        dps = [("dp", sp, "none", pricing) for sp in spreads]
        if pricing == "filler" and profile.e_forecast is not None and orders[0]:
            dps += [("dp", sp, "none", "reuse") for sp in spreads]
        free = spreads[-1] if len(spreads) == 1 else None
        measured = [w for w, x in (("sensitivity", profile.step_sensitivity), ("structure", profile.step_structure))
                    if x is not None]
        dps += [("dp", free, w, pricing) for w in measured]
    kinds = (dps if config.schedule == "dp" else []) + (
        [("uniform", None, "none", pricing)] if uniform or config.schedule == "uniform" else [])
    for kind, sp, weighting, priced in sorted(kinds, key=lambda k: preference(k[0], k[2], k[3])):  # (stable)
        fills = orders[:1] if priced != pricing else orders  # (a reuse-priced DP among filler-priced ones)
        for f in fills:
            try:
                p = plan(Config(**{**asdict(config), "prune": False, "anchors": None, "schedule": kind,
                                   "spread": sp, "forecast": f, "weighting": weighting, "pricing": priced}), profile)
            except ValueError:
                continue
            if not any(torch.equal(p.anchors, q.anchors) and torch.equal(p.fill_grid(), q.fill_grid()) for q in out):
                out.append(p)
    return out
