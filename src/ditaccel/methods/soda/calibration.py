"""SODA's calibration: its candidate plans run on a few samples of the user's pipeline and the one
closest to the full model kept (optionally under a measured wall-clock budget).  Unlike the
planner, these functions run the pipeline."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Callable

import torch

from ...plan import FORECAST_ORDERS, GATINGS, Plan
from ...sampling import as_images
from .planner import SPREADS, BudgetUnreachable, Config, candidates, plan, predict, schedules

CRITERIA = ("mse+ssim", "mse")


def _check_criterion(criterion: str) -> None:
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")


def scores(mse: torch.Tensor, dissimilarity: torch.Tensor, criterion: str = "mse+ssim") -> torch.Tensor:
    """(N,) float64: each sample's calibration score from its MSE and its ``1 - SSIM`` to the full
    model (lower is closer).  "mse+ssim": ``ln(mse) + ln(1 - ssim)`` (each floored at 1e-12), a
    fraction off in either counting alike, so that a plan is kept for the structure it keeps as
    well as its pixels (the late steps' errors change SSIM and perceptual features far more than
    pixels); "mse": the MSE alone.

    Example::

        s = scores(mse_per_image, 1 - ssim_per_image(full, images))   # calibrate() keeps the least mean
    """
    _check_criterion(criterion)
    if criterion == "mse":
        return mse.double()
    return mse.double().clamp_min(1e-12).log() + dissimilarity.double().clamp_min(1e-12).log()


def calibrate(pipe, run, plans: list[Plan], progress: bool = True,
              reference: torch.Tensor | None = None, within: float = 0.0,
              criterion: str = "mse+ssim") -> tuple[Plan, list[dict]]:
    """Run the full model and each plan through ``run(pipe)`` (same seeds every time; images in
    [0, 1]) and return the chosen plan, with one row per plan (anchors, how many modules prune,
    predicted error, measured MSE, PSNR and SSIM, and the per-sample ``criterion`` scores,
    :func:`scores`).  The chosen plan is the earliest of ``plans`` whose mean score lies within
    ``within`` standard errors (paired over the samples) of the least (:func:`prefer`; 0: the
    least, ties to the earlier plan): list the plans most preferred first.  The chosen plan's
    metadata records the calibration.  ``reference``: the full model's images from an earlier
    call (skips that run)."""
    from tqdm.auto import tqdm

    from ...metrics import ssim_per_image
    from ...runtime import apply, remove

    _check_criterion(criterion)  # (before any sampling)
    if not plans:
        raise ValueError("give at least one plan to calibrate")
    with torch.no_grad():
        reference = as_images(run(pipe)) if reference is None else reference
        rows = []
        for p in tqdm(plans, desc="calibrating", disable=not progress):
            apply(pipe, p)
            try:
                images = as_images(run(pipe))
            finally:
                remove(pipe)
            if images.shape != reference.shape:
                raise ValueError("run(pipe) returned images of another shape under a plan; it must "
                                 "sample the same seeds every call")
            per = (images.double() - reference.double()).pow(2).flatten(1).mean(1)   # (N,)
            dissimilarity = 1 - ssim_per_image(reference, images)
            score = scores(per, dissimilarity, criterion)
            mse = float(per.mean())
            config = p.meta.get("config", {})
            rows.append({"anchors": int(p.anchors.sum()), "pruned_modules": p.pruned_modules(), "method": p.method,
                         "schedule": config.get("schedule", "dp"), "spread": config.get("spread"),
                         "weighting": config.get("weighting", "none"),
                         "pricing": config.get("pricing", "filler"),
                         "forecast": p.forecast if p.fill is None else "segment",  # (chosen per segment)
                         "gating": p.gating,
                         "predicted_error": p.meta.get("predicted", {}).get("error"),
                         "predicted_image_error": p.meta.get("predicted", {}).get("image_error"),
                         "speedup_flops": p.meta.get("predicted", {}).get("speedup_flops"),
                         "mse": mse, "psnr": 10 * math.log10(1 / mse) if mse > 0 else math.inf,
                         "ssim": float(1 - dissimilarity.mean()), "mse_samples": per.tolist(),
                         "ssim_samples": (1 - dissimilarity).tolist(), "criterion": criterion,
                         "score": float(score.mean()), "score_samples": score.tolist()})
    best = prefer(rows, within)
    spread(rows, best)
    calibration = {"rows": rows, "chosen": best, "samples": int(reference.shape[0]), "criterion": criterion,
                   "margin_z": margin(rows, best)}
    return replace(plans[best], meta={**plans[best].meta, "calibration": calibration}), rows


def _per_sample(row: dict) -> torch.Tensor:
    """A calibration row's per-sample scores (``score_samples``; ``mse_samples`` where it has none)."""
    return torch.tensor(row["score_samples"] if "score_samples" in row else row["mse_samples"], dtype=torch.float64)


def prefer(rows: list[dict], within: float) -> int:
    """Index of the earliest row whose mean per-sample score (``score_samples``, or
    ``mse_samples`` where a row has no score) lies at most ``within`` standard errors of the paired
    per-sample difference above the row with the least: among plans the samples do not tell apart,
    the one listed first (the one-standard-error rule with ``within`` 1).  ``within`` 0: the least
    score, ties to the earlier row."""
    per = [_per_sample(r) for r in rows]
    low = min(range(len(rows)), key=lambda i: (float(per[i].mean()), i))
    if within <= 0:
        return low
    for i in range(low):
        if _paired_z(per[i], per[low]) <= within:
            return i
    return low


def _paired_z(per: torch.Tensor, base: torch.Tensor) -> float:
    """How many standard errors of the paired per-sample difference ``per - base``'s mean lies
    above 0: 0 where the mean is 0, inf where the difference has no spread (every sample differs
    by the same amount, or one sample)."""
    diff = per - base
    n = len(diff)
    se = float(diff.std() / math.sqrt(n)) if n > 1 else math.nan
    mean = float(diff.mean())
    return 0.0 if mean == 0 else (mean / se if se > 0 else math.inf)


def spread(rows: list[dict], chosen: int) -> None:
    """Add to each calibration row (with its per-sample MSEs, ``mse_samples``) the standard error
    of its MSE (``mse_se``) and how many standard errors of the paired per-sample difference its
    mean score (:func:`prefer`) lies above the chosen row's (``z_vs_chosen``; 0 for the chosen
    one, inf where every sample differs by the same amount)."""
    scored = [_per_sample(r) for r in rows]
    for row, per in zip(rows, scored):
        mse = torch.tensor(row["mse_samples"], dtype=torch.float64)
        row["mse_se"] = float(mse.std() / math.sqrt(len(mse))) if len(mse) > 1 else math.nan
        row["z_vs_chosen"] = _paired_z(per, scored[chosen])


def margin(rows: list[dict], chosen: int) -> float | None:
    """How many standard errors (paired over the samples) the runner-up's score lies above the
    chosen plan's: below about 2, the calibration samples do not tell the two apart (negative: a
    plan measured closer, within the noise, was passed over for the chosen, preferred one)."""
    others = [r["z_vs_chosen"] for i, r in enumerate(rows) if i != chosen and "z_vs_chosen" in r]
    return min(others) if others else None


@dataclass
class CalibrationConfig:
    """How :func:`calibrate_soda` measures SODA's candidates: ``fewer`` (how many anchors fewer the
    pruning candidates may have), ``spreads`` and ``forecasts`` (the schedules and forecast orders
    of the first round), ``within`` (how many standard errors a less preferred candidate must
    measure better by to be kept: :func:`prefer`), ``prune_within`` (the same for the second round,
    where a pruning plan must beat the kept caching-only one: it is one of several tried against
    it, and its partial recomputes cost time that pricing only estimates; in a timed search, how
    much closer a pruning plan must measure to be timed before a caching-only one,
    :func:`timing_order`), ``criterion`` (what
    "closest to the full model" means: :func:`scores`), ``timed`` (a run to time, for a wall-clock
    budget), ``repeats``, ``tolerance`` and ``more`` (the timed search), ``progress``, ``gatings``
    (the ``Plan.gating`` of collapsed steps tried on the first round's kept plan, the first preferred).

    Example::

        calibrate_soda(pipe, run, profile, speedup=2.5, calibration=CalibrationConfig(fewer=2))
    """
    fewer: int = 3
    spreads: tuple = SPREADS
    forecasts: tuple = FORECAST_ORDERS
    progress: bool = True
    timed: Callable | None = None
    repeats: int = 3
    tolerance: float = 0.03
    more: int = 2
    within: float = 1.0
    gatings: tuple = GATINGS
    prune_within: float = 2.0
    criterion: str = "mse+ssim"

    def __post_init__(self):
        _check_criterion(self.criterion)


def calibrate_soda(pipe, run, profile, calibration: CalibrationConfig | None = None, **options) -> Plan:
    """``calibrate_soda(pipe, run, profile, speedup=2.5)``: SODA with its choices measured on
    ``run(pipe)`` (a few samples on seeds other than those you evaluate on; images in [0, 1]).
    ``options``: the plan's, as :func:`~ditaccel.methods.soda.plan_soda` takes them (a budget:
    ``speedup=`` or ``latency_speedup=``); ``calibration``: how to measure (the keyword form of its
    fields, ``calibrate_soda(..., timed=run)``, still works, with a DeprecationWarning).

    Two rounds: the anchor schedule and what the other steps get (caching-only plans with the DP's
    schedule held to a ``spread`` or free, priced by the filler it runs or by plain reuse, or evenly
    spaced, each forecasting or reusing module outputs; :func:`schedules`), the kept one then tried
    with each of ``gatings`` on its collapsed
    steps (``Plan.gating``: this step's gates, or those each output was computed with), then, on the
    kept schedule, pricing, forecast order and gating, whether token
    pruning (on as many anchors or fewer) beats it (:func:`candidates`).  Each round keeps the
    most preferred plan that the samples cannot tell from the closest to the full model (within
    ``within`` standard errors, :func:`prefer`; ``prune_within`` in the second): schedules priced
    by their filler before those priced by reuse, more even
    schedules before less even ones, forecasts before reuse, and caching only before pruning,
    which costs more time than its FLOPs say.  The kept plan's metadata lists every measured candidate.

    ``timed`` (with ``latency_speedup``): budget by measured wall-clock time instead of the
    latency model.  The second round also offers caching-only plans with up to ``more`` anchors
    more or fewer than the model's budget affords; from the closest to the full model on, each
    candidate's speedup is measured on ``timed(pipe)`` (median of ``repeats`` back-to-back pairs
    with the full model; a pruning plan only before the caching-only plans it measures closer than
    by more than ``prune_within`` standard errors: :func:`timing_order`) until one reaches
    ``latency_speedup`` within ``tolerance`` (one short by less than another ``tolerance`` is timed
    again on more pairs, and kept over a later one that overshoots the target further than it
    falls short: :func:`_fastest_enough`); if none does, the fastest is kept."""
    from ...options import resolve

    measure_names = {f.name for f in fields(CalibrationConfig)}
    cal = resolve(CalibrationConfig, calibration, {k: v for k, v in options.items() if k in measure_names},
                  "calibrate_soda")
    options = {k: v for k, v in options.items() if k not in measure_names}
    fewer, spreads, forecasts, progress, timed = cal.fewer, cal.spreads, cal.forecasts, cal.progress, cal.timed
    repeats, tolerance, more, within = cal.repeats, cal.tolerance, cal.more, cal.within
    config = Config(**options)
    if config.speedup is None and config.latency_speedup is None:
        raise ValueError("calibration needs a speedup or latency_speedup budget")
    if timed is not None and config.latency_speedup is None:
        raise ValueError("a timed calibration budgets by measured wall-clock time: give latency_speedup, "
                         "not speedup")
    if config.spread is not None:
        spreads = (config.spread,)
    first = schedules(config, profile, spreads, forecasts, uniform=config.spread is None)
    if not first:
        raise BudgetUnreachable()
    with torch.no_grad():
        reference = as_images(run(pipe))
    best, rows = calibrate(pipe, run, first, progress, reference, within, cal.criterion)
    chosen = best.meta["calibration"]["chosen"]
    from ...runtime.collapse import collapsible_steps

    gatings = tuple(cal.gatings)
    if config.gating is None and gatings and gatings != (best.gating,) and any(collapsible_steps(best)):
        # the kept schedule with each gating of its collapsed steps (the first listed preferred)
        fresh = [g for g in gatings if g != best.gating]
        tried = {best.gating: best, **{g: replace(best, gating=g, meta={**best.meta, "config": {
            **best.meta["config"], "gating": g}}) for g in fresh}}
        _, new_rows = calibrate(pipe, run, [tried[g] for g in fresh], progress, reference, criterion=cal.criterion)
        index = {best.gating: chosen, **{g: len(rows) + i for i, g in enumerate(fresh)}}
        rows = rows + new_rows
        kept_gating = gatings[prefer([rows[index[g]] for g in gatings], within)]
        best, chosen = tried[kept_gating], index[kept_gating]
    kept = replace(config, spread=best.meta["config"]["spread"], schedule=best.meta["config"]["schedule"],
                   forecast=best.meta["config"]["forecast"],  # (None: chosen per segment)
                   weighting=best.meta["config"].get("weighting", "none"), gating=best.gating,
                   pricing=best.meta["config"].get("pricing", "filler"))
    more_plans = candidates(kept, profile, fewer)[1:] if config.prune else []
    if timed is not None:
        k0 = int(best.anchors.sum())
        fixed = {**asdict(kept), "latency_speedup": None, "prune": False}
        for k in [k for k in range(k0 - more, k0 + more + 1) if k != k0 and 1 <= k <= profile.num_steps]:
            try:
                more_plans.append(plan(Config(**{**fixed, "anchors": k}), profile))
            except ValueError:
                continue
    if more_plans:
        _, more_rows = calibrate(pipe, run, more_plans, progress, reference, criterion=cal.criterion)
        if timed is None:  # the kept plan first: another only where it measures better beyond the noise
            j = prefer([rows[chosen], *more_rows], cal.prune_within)
            if j:
                best, chosen = more_plans[j - 1], len(rows) + j - 1
        rows = rows + more_rows
    if timed is not None:
        pool = [(chosen, best)] + [(len(rows) - len(more_plans) + i, p) for i, p in enumerate(more_plans)]
        best, chosen = _fastest_enough(pipe, timed, pool, rows, config.latency_speedup, tolerance,
                                       repeats, progress, cal.prune_within)
    from ...runtime import RUNTIME_REVISION  # what the timings were measured with

    spread(rows, chosen)
    calibration = {"rows": rows, "chosen": chosen, "samples": int(reference.shape[0]), "criterion": cal.criterion,
                   "margin_z": margin(rows, chosen),
                   **({"timed": {"target": config.latency_speedup, "tolerance": tolerance, "repeats": repeats,
                                 "runtime": RUNTIME_REVISION}} if timed is not None else {})}
    return replace(best, meta={**best.meta, "calibration": calibration})


def timing_order(rows: list[dict], indices: list[int], prune_within: float) -> list[int]:
    """``indices`` (rows of a calibration) in the order a timed calibration tries them: by mean score
    (:func:`scores`), except that a plan that prunes tokens comes after every caching-only plan
    whose per-sample scores it does not beat by more than ``prune_within`` standard errors (paired,
    :func:`prefer`'s test), and after a caching-only plan of equal score.  Pruning's partial
    recomputes cost time its pricing only estimates, so within the noise the caching-only plan is
    timed (and kept, when fast enough) first, as the untimed second round keeps it.

    Example::

        timing_order(rows, [15, 16], 2.0)   # [15, 16] where row 16 prunes and scores within 2 SE of 15
    """
    per = {i: _per_sample(rows[i]) for i in indices}

    def key(i: int) -> tuple:
        score, prunes = rows[i]["score"], rows[i]["pruned_modules"] > 0
        if prunes:
            score = max([score, *(rows[j]["score"] for j in indices if rows[j]["pruned_modules"] == 0
                                  and rows[j]["score"] > score and _paired_z(per[j], per[i]) <= prune_within)])
        return score, prunes, i
    return sorted(indices, key=key)


def _fastest_enough(pipe, timed, pool: list[tuple[int, Plan]], rows: list[dict], target: float, tolerance: float,
                    repeats: int, progress: bool, prune_within: float) -> tuple[Plan, int]:
    """In :func:`timing_order` (``prune_within`` 0: by calibration score alone), the first plan
    of ``pool`` (row index, plan) whose measured speedup (recorded in its row as ``speedup_measured``,
    with ``timing_pairs``) reaches ``target * (1 - tolerance)``; the fastest if none.

    Timing is noisy by about the tolerance itself, so a plan measured just short (within another
    ``tolerance``) is timed again with twice as many pairs more and judged on the median of all;
    and where the first plan fast enough overshoots the target by more than ``tolerance`` while
    such a near miss was closer to the target, the near miss is kept: one slightly slow plan beats
    one with far fewer full steps than the budget affords."""
    import math
    import statistics

    from tqdm.auto import tqdm

    from ...runtime import apply, remove
    from ...sampling import speedup_pairs

    def attach(p):
        def on(q):
            apply(q, p)
            return lambda: remove(q)
        return on

    floor = target * (1 - tolerance)
    near = None  # the best-scored near miss: (row, plan)
    with torch.no_grad():
        timed(pipe)  # warm-up
        plans = dict(pool)
        for i in tqdm(timing_order(rows, list(plans), prune_within), desc="timing", disable=not progress):
            p = plans[i]
            pairs = speedup_pairs(pipe, timed, attach(p), repeats)
            if floor * (1 - tolerance) <= statistics.median(pairs) < floor:
                pairs += speedup_pairs(pipe, timed, attach(p), 2 * repeats)
            rows[i]["speedup_measured"] = statistics.median(pairs)
            rows[i]["timing_pairs"] = len(pairs)
            measured = rows[i]["speedup_measured"]
            if measured >= floor:
                if near is not None and measured > target * (1 + tolerance) and \
                        abs(math.log(rows[near[0]]["speedup_measured"] / target)) < abs(math.log(measured / target)):
                    return near[1], near[0]
                return p, i
            if near is None and measured >= floor * (1 - tolerance):
                near = (i, p)
    i, p = max(pool, key=lambda ip: rows[ip[0]]["speedup_measured"])
    return p, i
