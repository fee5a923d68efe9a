"""SODA's planner (Sensitivity-Oriented Dynamic Acceleration; CVPR 2026, arXiv 2603.07057), planned
from a :class:`~ditaccel.profiling.Profile`.  Pure functions: profile + config -> Plan.

- DCS: the anchor steps by dynamic programming, the cost of a segment being the summed cache error
  of the steps that reuse its anchor (:func:`dp_schedule`).
- UAS: on non-anchor steps, per (layer, module), recompute the fraction
  ``rho = clip(lam * E_c / mean(E_c) + beta, 0, rho_max)`` of tokens (snapped down to the profiled
  ratios) where that beats plain reuse (``E_p < (1 - margin) * E_c``), else reuse.  ``beta`` is
  solved by bisection so the plan meets the budget.
- With a speedup budget, every feasible anchor count is tried and the plan with the lowest
  predicted error is kept.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import torch

from ...plan import FORECAST_ORDERS, FULL, REUSE, TOKEN_SCORES, Plan, check_forecast


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
                                          # 0 for plan(), measured by calibrate_soda

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
        if self.schedule not in ("dp", "uniform"):
            raise ValueError(f"schedule must be 'dp' or 'uniform', got {self.schedule!r}")
        if self.spread is not None and not 1.0 <= self.spread < math.inf:
            raise ValueError(f"spread must be >= 1 (1 = as even as possible), got {self.spread}")
        if self.token_score is not None and self.token_score not in TOKEN_SCORES:
            raise ValueError(f"unknown token score {self.token_score!r}; choose one of {TOKEN_SCORES}")
        if self.forecast is not None:
            check_forecast(self.forecast)
        if not (0 < self.rho_max < 1 and 0 <= self.lam < math.inf and 0 <= self.margin < 1):
            raise ValueError(f"need 0 < rho_max < 1, 0 <= lam < inf and 0 <= margin < 1, got rho_max "
                             f"{self.rho_max}, lam {self.lam}, margin {self.margin}")

    def tag(self) -> str:
        target = (f"x{self.speedup:g}" if self.speedup else f"lat{self.latency_speedup:g}"
                  if self.latency_speedup else f"a{self.anchors}")
        parts = ["soda" if self.prune else "soda-cache", self.schedule if self.schedule != "dp" else None,
                 f"s{self.spread:g}" if self.spread and self.schedule == "dp" else None,
                 f"f{self.forecast}" if self.forecast else None, target]
        return "-".join(p for p in parts if p)


# ------------------------------------------------------------------------------------------------
# DCS: the dynamic program


def segment_costs(e_cache: torch.Tensor, max_len: int) -> torch.Tensor:
    """(T, max_len + 1) cost of an anchor at step ``a`` reused for the next ``n - 1`` steps:
    sum over those steps ``a + j`` (cache age ``j``) and over (layer, module) of ``E_c``.
    ``e_cache``: (T, L, M, ages) with ages 1..A; inf where a segment is impossible."""
    t_steps, ages = e_cache.shape[0], e_cache.shape[-1]
    per = e_cache.double().nan_to_num(nan=math.inf).sum(dim=(1, 2))  # (T, A): step t at age j
    cost = torch.full((t_steps, max_len + 1), math.inf, dtype=torch.float64)
    for a in range(t_steps):
        total = 0.0
        for n in range(1, max_len + 1):
            if n > 1:
                j = n - 1
                if a + j >= t_steps or j > ages:
                    break
                total += float(per[a + j, j - 1])
            if a + n <= t_steps:
                cost[a, n] = total
    return cost


def dp_schedule(cost: torch.Tensor, num_anchors: int) -> tuple[torch.Tensor, float]:
    """Anchor steps (T,) bool minimising the summed segment cost with exactly ``num_anchors``
    anchors, step 0 always one: ``dp[t][k] = min_n cost[t, n] + dp[t + n][k - 1]``."""
    t_steps, max_len = cost.shape[0], cost.shape[1] - 1
    if not 1 <= num_anchors <= t_steps:
        raise ValueError(f"need 1..{t_steps} anchors, got {num_anchors}")
    inf = math.inf
    dp = [[inf] * (num_anchors + 1) for _ in range(t_steps + 1)]
    choice = [[0] * (num_anchors + 1) for _ in range(t_steps + 1)]
    dp[t_steps][0] = 0.0
    c = cost.tolist()
    for t in range(t_steps - 1, -1, -1):
        for k in range(1, num_anchors + 1):
            best, arg = inf, 0
            for n in range(1, max_len + 1):
                if t + n > t_steps or c[t][n] == inf:
                    continue
                v = c[t][n] + dp[t + n][k - 1]
                if v < best:
                    best, arg = v, n
            dp[t][k], choice[t][k] = best, arg
    if dp[0][num_anchors] == inf:
        raise ValueError(f"{num_anchors} anchors cannot cover {t_steps} steps with segments of at "
                         f"most {max_len} steps")
    anchors = torch.zeros(t_steps, dtype=torch.bool)
    t, k = 0, num_anchors
    while t < t_steps:
        anchors[t] = True
        t, k = t + choice[t][k], k - 1
    return anchors, float(dp[0][num_anchors])


def uniform_schedule(num_steps: int, num_anchors: int) -> torch.Tensor:
    anchors = torch.zeros(num_steps, dtype=torch.bool)
    anchors[torch.linspace(0, num_steps, num_anchors + 1)[:-1].floor().long()] = True
    return anchors


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


def predict(plan: Plan, profile) -> dict[str, float]:
    """FLOPs (per sample), latency (ms per call at the profile's timing batch) and summed error
    that the profile predicts for ``plan``."""
    t_steps = plan.num_steps
    tok = plan.tokens
    ridx = _ratio_index(profile, tok)
    mf = profile.module_flops.double()                    # (L, M, R + 1)
    ms = profile.module_ms.double()                       # (M, R + 1)
    rest_flops = profile.step_flops - float(mf[..., -1].sum())
    flops = latency = error = 0.0
    ages = ages_of(plan.anchors)
    score = profile.token_scores.index(plan.token_score) if plan.token_score in profile.token_scores else 0
    for t in range(t_steps):
        if plan.anchors[t]:
            flops += profile.step_flops
            latency += profile.step_ms
            continue
        flops += rest_flops
        latency += profile.reuse_ms
        j = int(ages[t])
        for layer in range(plan.num_layers):
            for mi in range(len(plan.modules)):
                k, ri = int(tok[t, layer, mi]), int(ridx[t, layer, mi])
                if k == REUSE:
                    error += _err(profile.e_cache, t, layer, mi, j)
                    continue
                flops += float(mf[layer, mi, ri])
                latency += float(ms[mi, ri])
                if k != FULL:
                    error += _err(profile.e_prune[..., ri, score], t, layer, mi, j)
    full_flops, full_ms = t_steps * profile.step_flops, t_steps * profile.step_ms
    return {"flops": flops, "speedup_flops": full_flops / flops, "latency_ms": latency,
            "speedup_latency": full_ms / latency, "error": error}


def _err(table, t, layer, mi, age) -> float:
    if age > table.shape[3]:
        return math.inf
    v = float(table[t, layer, mi, age - 1])
    return math.inf if math.isnan(v) else v


# ------------------------------------------------------------------------------------------------
# UAS and the search


def _prune_tokens(profile, anchors: torch.Tensor, beta: float, cfg: Config, score: int) -> torch.Tensor:
    t_steps, n_layers, n_mods = profile.e_cache.shape[:3]
    tokens = torch.full((t_steps, n_layers, n_mods), FULL, dtype=torch.int32)
    ages = ages_of(anchors)
    non = ~anchors
    if not non.any():
        return tokens
    t_idx = torch.nonzero(non).flatten()
    j_idx = ages[t_idx] - 1
    e_c = profile.e_cache[t_idx, :, :, j_idx].double()  # (n, L, M)
    tokens[t_idx] = REUSE
    if not cfg.prune:
        return tokens
    mean = float(e_c[torch.isfinite(e_c)].mean()) if torch.isfinite(e_c).any() else 1.0
    rho = (cfg.lam * e_c / max(mean, 1e-12) + beta).clamp(0, cfg.rho_max)
    ratios = torch.tensor(profile.ratios, dtype=torch.float64)
    # snap down to the profiled ratios (below the smallest one: no recompute)
    ri = torch.bucketize(rho, ratios, right=True) - 1                       # (n, L, M), -1 = none
    e_p = profile.e_prune[t_idx, :, :, j_idx][..., score].double()  # (n, L, M, R)
    chosen = e_p.gather(-1, ri.clamp_min(0)[..., None]).squeeze(-1)
    use = (ri >= 0) & (chosen < (1 - cfg.margin) * e_c)
    ks = torch.tensor([profile.tokens_for_ratio(r) for r in profile.ratios], dtype=torch.int32)
    vals = torch.where(use, ks[ri.clamp_min(0)], torch.tensor(REUSE, dtype=torch.int32))
    tokens[t_idx] = vals.to(torch.int32)
    return tokens


def _cost(pred: dict, cfg: Config) -> float:
    return pred["latency_ms"] if cfg.latency_speedup else pred["flops"]


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
    cost = segment_costs(profile.e_cache, max_len)
    full_flops, full_ms = t_steps * profile.step_flops, t_steps * profile.step_ms
    target = None
    if cfg.speedup:
        target = full_flops / cfg.speedup
    elif cfg.latency_speedup:
        target = full_ms / cfg.latency_speedup

    def schedule(k: int) -> torch.Tensor:
        if cfg.schedule == "uniform":
            return uniform_schedule(t_steps, k)
        if cfg.spread is not None:  # no gap longer than spread x the even one
            return dp_schedule(cost[:, :max(math.ceil(cfg.spread * t_steps / k), math.ceil(t_steps / k)) + 1], k)[0]
        return dp_schedule(cost, k)[0]

    def make(anchors, tokens, extra) -> Plan:
        p = Plan(num_tokens=profile.num_tokens, modules=profile.modules, anchors=anchors, tokens=tokens,
                 token_score=score_name, method="soda" if cfg.prune else "soda-cache", forecast=cfg.forecast or 0)
        meta = {"config": asdict(cfg), "predicted": predict(p, profile),
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
        if target is None:  # anchors only: the rule with beta = 0
            tokens = _prune_tokens(profile, anchors, 0.0, cfg, score)
            return make(anchors, tokens, {"anchors": k, "beta": 0.0})
        base = make(anchors, _prune_tokens(profile, anchors, -math.inf, cfg, score), {})
        if _cost(base.meta["predicted"], cfg) > target * (1 + 1e-9):
            if cfg.anchors is not None:
                raise ValueError(f"{k} anchors alone cost more than the budget allows; use fewer "
                                 "anchors or a smaller speedup")
            break  # more anchors only cost more
        beta = _solve_beta(profile, anchors, cfg, score, target, make) if cfg.prune else -math.inf
        chosen = make(anchors, _prune_tokens(profile, anchors, beta, cfg, score),
                      {"anchors": k, "beta": beta if math.isfinite(beta) else None})
        if best is None or chosen.meta["predicted"]["error"] < best.meta["predicted"]["error"]:
            best = chosen
    if best is None:
        raise BudgetUnreachable()
    return best


def _solve_beta(profile, anchors, cfg: Config, score: int, target: float, make) -> float:
    """The largest beta whose plan stays within the budget (bisection; cost grows with beta)."""
    lo, hi = -cfg.lam * 50 - cfg.rho_max, cfg.rho_max

    def fits(beta):
        p = make(anchors, _prune_tokens(profile, anchors, beta, cfg, score), {})
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


SPREADS = (None, 2.0, 1.5, 1.0)


def schedules(config: Config, profile, spreads=SPREADS, forecasts=FORECAST_ORDERS,
              uniform: bool = True) -> list[Plan]:
    """Caching-only plans for ``config``'s budget, one per anchor schedule (duplicates dropped):
    the DP schedule free, then held ever closer to evenly spaced anchors (``spreads``), then
    (``uniform``) evenly spaced anchors (only those when ``config.schedule`` is "uniform"); each
    with every order in ``forecasts``
    (``config.forecast`` when set) for what non-anchor steps get."""
    out = []
    orders = forecasts if config.forecast is None else (config.forecast,)
    kinds = ([("dp", sp) for sp in spreads] if config.schedule == "dp" else []) + (
        [("uniform", None)] if uniform or config.schedule == "uniform" else [])
    for kind, sp in kinds:
        try:
            p = plan(Config(**{**asdict(config), "prune": False, "anchors": None, "schedule": kind, "spread": sp,
                               "forecast": None}), profile)
        except ValueError:
            continue
        if any(torch.equal(p.anchors, q.anchors) for q in out):
            continue
        for f in orders:
            meta = {**p.meta, "config": {**p.meta["config"], "forecast": f}}
            out.append(replace(p, forecast=f, meta=meta))
    return out
