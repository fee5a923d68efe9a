"""Speed/quality benchmark of acceleration methods on one pipeline (``ditaccel bench``).

Every method is swept over its knob; per configuration:

- fidelity: ``run(pipe)`` (the scored samples; images in [0, 1]) under torch's FlopCounterMode, so
  every method's FLOPs are counted the same way on the very run that is scored: PSNR, SSIM and
  Fréchet distance (EfficientNet-lite0 features) vs the full model's images, plus whatever
  ``extra(images)`` adds (the benchmark script adds FD vs real data and classifier agreement);
- speed: ``timed(pipe)`` (one batch), the full model and the configuration back to back, ``repeats``
  times with the order alternating, after a warm-up; measured speedup = median of the per-pair
  ratios; execution efficiency = measured / FLOP speedup.

Methods: ours (FORA, FORA with first-order forecasts, ToCa-style, Δ-DiT-style, SODA calibrated
under a FLOP budget and under a wall-clock budget, timed on the benchmark's timed batch, and its
ablation ``soda-reuse``: planned on the profile's reuse errors alone) and the peers of
:mod:`ditaccel.peers` (diffusers' cache hooks, cache-dit).

    entries = method_entries(pipe, num_steps=50, profile=prof, calibration_run=cal)
    out = measure(pipe, run, timed, entries)
    print(report(out)); plot(out, "bench.png")
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, replace
from typing import Any, Callable

import torch

from .methods import make_plan, model_shape, soda
from .metrics import frechet_distance, psnr, ssim
from .peers import PEERS, PeerUnavailable, attach_peer, calibrate_magcache
from .runtime import apply, remove
from .sampling import as_images, speedup_pairs

OURS: dict[str, tuple[str, tuple[float, ...], tuple[float, ...]]] = {  # name -> (knob, sweep, quick sweep)
    "fora": ("interval", (2, 3, 4, 6), (2,)),
    "fora-forecast": ("interval", (2, 3, 4, 6), (3,)),
    "toca": ("interval", (2, 3, 4, 6), (3,)),
    "delta-dit": ("interval", (2, 3, 6), (3,)),
    "soda": ("speedup", (1.5, 2.0, 2.5, 3.0, 4.0), (2.0,)),
    "soda-latency": ("latency_speedup", (1.5, 2.0, 2.5, 3.0, 4.0), (2.0,)),
    "soda-reuse": ("speedup", (1.5, 2.0, 2.5, 3.0, 4.0), (2.0,)),
}
SODA = ("soda", "soda-latency")  # one method under two budgets (FLOPs; measured wall-clock time)
# SODA's ablations: shown beside it, not among the methods it must beat. soda-reuse: calibrated as
# "soda" is, on the same profile without its forecast errors and step sensitivity (the profile
# before fillers and the images' sensitivity were measured: its DP prices every segment by the
# summed plain-reuse errors)
ABLATIONS = ("soda-reuse",)
QUICK_PEERS = {"fbc": (0.06,), "pab": (3,), "fastercache": (2,), "taylorseer": (3,), "magcache": (0.04,),
               "dbcache": (0.06,), "dbcache-taylorseer": (0.06,)}
METHOD_NAMES = (*OURS, *PEERS)
TOCA_RATIO = 0.1  # ToCa-style: fraction of tokens recomputed on cached steps


@dataclass
class Entry:
    """One configuration: ``prepare(pipe)`` does any calibration and returns ``attach``, where
    ``attach(pipe)`` switches the method on and returns the function that switches it off."""
    method: str
    family: str  # "ours" or the peer's library
    knob: str
    value: float
    prepare: Callable[[Any], Callable[[Any], Callable[[], None]]]


def parse_sweeps(items: list[str] | None) -> dict[str, tuple[float, ...]]:
    """``["soda=2,3", "fora=2"]`` -> ``{"soda": (2.0, 3.0), "fora": (2.0,)}``, checked."""
    out = {}
    for item in items or []:
        name, sep, values = item.partition("=")
        if not sep or name not in METHOD_NAMES:
            raise ValueError(f"--sweep takes METHOD=V1,V2,... with METHOD one of {', '.join(METHOD_NAMES)}; "
                             f"got {item!r}")
        try:
            out[name] = tuple(float(v) for v in values.split(",") if v.strip())
        except ValueError:
            raise ValueError(f"--sweep {item!r}: the values must be numbers") from None
        if not out[name]:
            raise ValueError(f"--sweep {item!r} lists no values")
    return out


def check_methods(methods: list[str]) -> list[str]:
    """``methods`` if every name is a known method (and there is one), else a one-line error."""
    unknown = [m for m in methods if m not in METHOD_NAMES]
    if unknown or not methods:
        raise ValueError(f"unknown method {', '.join(unknown) or '(none given)'}; choose from "
                         f"{', '.join(METHOD_NAMES)}")
    return methods


def method_entries(pipe, num_steps: int, *, methods: list[str] | None = None, quick: bool = False,
                   sweeps: dict[str, tuple[float, ...]] | None = None, profile=None,
                   calibration_run: Callable | None = None, timed_run: Callable | None = None,
                   plan_dir=None, compile=False) -> list[Entry]:
    """The configurations to measure: each method (default: all) at each value of its sweep.
    SODA needs ``profile`` (for this pipeline, sampler and step count; or a function that makes it,
    called when a SODA entry is first prepared, so a resumed run that has measured every SODA row
    does not profile again) and ``calibration_run``
    (a few samples on other seeds; also MagCache's calibration run).  ``timed_run``: what
    soda-latency times its candidate plans on (give the benchmark's ``timed``: per-call costs weigh
    more on a small batch, so a budget met on another batch size is missed on the timed one;
    default: the calibration run).  ``plan_dir``: keep SODA's
    calibrated plans there and reuse them on later runs with the same profile and calibration run
    (delete the folder when any of them changes).  ``compile``: our plans are applied with
    ``apply(..., compile=compile)`` (peers run as they are)."""
    methods = check_methods(list(METHOD_NAMES) if methods is None else methods)
    sweeps = sweeps or {}
    if any(m.startswith("soda") for m in methods) and (profile is None or calibration_run is None):
        raise ValueError("SODA needs a profile of this pipeline and a calibration run")
    shape = model_shape(pipe.transformer, num_steps)
    out = []

    def planned(plan):
        def attach(p):
            apply(p, plan, compile=compile)
            return lambda: remove(p)
        return attach

    for method, (knob, sweep, quick_sweep) in OURS.items():
        if method not in methods:
            continue
        for v in sweeps.get(method, quick_sweep if quick else sweep):
            def prepare(p, method=method, knob=knob, v=v):
                if method.startswith("soda"):
                    return planned(_calibrated(p, calibration_run, timed_run or calibration_run, profile, plan_dir,
                                               method, knob, v, num_steps))
                extra = {"ratio": TOCA_RATIO} if method == "toca" else {}
                if method == "fora-forecast":  # FORA with first-order forecasts (TaylorSeer-like)
                    return planned(make_plan("fora", shape, interval=int(v), forecast=1))
                return planned(make_plan(method, shape, interval=int(v), **extra))
            out.append(Entry(method, "ours", knob, v, prepare))
    ratios: dict[str, list[float]] = {}
    for name, peer in PEERS.items():
        if name not in methods:
            continue
        for v in sweeps.get(name, QUICK_PEERS[name] if quick else peer.sweep):
            def prepare(p, name=name, peer=peer, v=v):
                if peer.needs_calibration and "ratios" not in ratios:
                    if calibration_run is None:
                        raise ValueError(f"{name} needs a calibration run")
                    ratios["ratios"] = calibrate_magcache(p, calibration_run, num_steps)
                attach_peer(p, name, v, num_steps, mag_ratios=ratios.get("ratios")).remove()  # fails early
                return lambda q: attach_peer(q, name, v, num_steps, mag_ratios=ratios.get("ratios")).remove
            out.append(Entry(name, peer.library, peer.knob, v, prepare))
    return out


def counted(run, pipe) -> tuple[torch.Tensor, int]:
    """``run(pipe)``'s images (as a tensor) and the FLOPs it took (``metrics.flop_counter``)."""
    from .metrics import flop_counter

    with flop_counter() as counter:
        images = as_images(run(pipe))
    return images, int(counter.get_total_flops())


def plan_path(plan_dir, method: str, knob: str, value: float):
    """Where :func:`method_entries` keeps a SODA row's calibrated plan under ``plan_dir``."""
    from pathlib import Path

    return Path(plan_dir) / f"{method}-{knob}{value:g}.json"


def _calibrated(pipe, calibration_run, timed_run, profile, plan_dir, method: str, knob: str, value: float,
                num_steps: int):
    from .io import model_fingerprint, write_json
    from .plan import Plan

    path = None if plan_dir is None else plan_path(plan_dir, method, knob, value)
    if path is not None and path.exists():
        plan = Plan.load(path)
        timed_cal = plan.meta.get("calibration", {}).get("timed")
        # the budget asked for: a timed calibration may keep a plan made for a number of anchors,
        # whose own config names no latency budget, so its target is read from the calibration
        asked = timed_cal.get("target") if timed_cal else plan.meta.get("config", {}).get(knob)
        from .runtime import same_speed

        if (plan.meta.get("fingerprint") == model_fingerprint(pipe.transformer) and plan.num_steps == num_steps
                and asked == value and (timed_cal is not None) == (method == "soda-latency")
                and (timed_cal is None or same_speed(timed_cal.get("runtime", 1), pipe.transformer.dtype))):
            return plan  # (a plan timed with an older, slower runtime is calibrated again)
    profile = profile() if callable(profile) else profile
    if method == "soda-reuse":
        profile = replace(profile, e_forecast=None, step_sensitivity=None, step_structure=None)
    # soda-latency: the budget is measured wall-clock time, on the run the benchmark times
    timed = timed_run if method == "soda-latency" else None
    plan = soda.calibrate_soda(pipe, calibration_run, profile, soda.CalibrationConfig(progress=False, timed=timed),
                               **{knob: value})
    if path is not None:
        write_json(path, plan.to_dict())
    return plan


@dataclass
class MeasureConfig:
    """How :func:`measure` measures: ``repeats`` timed pairs per entry (0: fidelity only),
    ``extra(images) -> dict`` for more columns, the ``feature_extractor`` for Fréchet distances
    (default ``metrics.feature_extractor()``), ``progress``; to resume a stopped run,
    ``on_row(row)`` / ``on_full(images, flops)`` are told each row and the full model's result as
    they come, and ``resumed`` (those rows, skip records included; their entries are not run again:
    each row's speedup is timed against the full model within its own pairs, so it keeps) and
    ``full`` ((images, flops) from ``on_full``) give them back.

    Example::

        bench.measure(pipe, run, timed, entries, MeasureConfig(repeats=5, on_row=print))
    """
    repeats: int = 3
    extra: Callable[[torch.Tensor], dict] | None = None
    feature_extractor: Any = None
    progress: bool = True
    on_row: Callable[[dict], None] | None = None
    resumed: list[dict] | None = None
    full: tuple[torch.Tensor, int] | None = None
    on_full: Callable[[torch.Tensor, int], None] | None = None


def measure(pipe, run: Callable, timed: Callable, entries: list[Entry], config: MeasureConfig | None = None,
            **options) -> dict:
    """Measure the full model and every entry (see the module docstring) as ``config`` says (the
    keyword form of its fields still works, with a DeprecationWarning); returns ``{"rows": [...],
    "skipped": [...]}``, the first row the full model's."""
    from .options import resolve

    cfg = resolve(MeasureConfig, config, options, "measure")
    repeats, extra, feature_extractor, progress = cfg.repeats, cfg.extra, cfg.feature_extractor, cfg.progress
    on_row, resumed, full, on_full = cfg.on_row, cfg.resumed, cfg.full, cfg.on_full
    from tqdm.auto import tqdm

    from .metrics import feature_extractor as default_fx

    if repeats < 0:
        raise ValueError(f"repeats must be >= 0 (0: fidelity only), got {repeats}")
    fx = feature_extractor or default_fx()
    with torch.no_grad():
        if repeats:
            timed(pipe)  # warm-up
        if full is None:
            full, full_flops = counted(run, pipe)
            if on_full:
                on_full(full, full_flops)
        else:
            full, full_flops = full
    if full.shape[0] < 2:
        raise ValueError("the scored run must give at least 2 images (Fréchet distance needs them)")
    full_feats = fx(full)

    def quality(images) -> dict:
        q = {"psnr": psnr(full, images), "ssim": ssim(full, images),
             "fd_vs_full": frechet_distance(fx(images), full_feats)}
        return {**q, **(extra(images) if extra else {})}

    rows = [{"method": "full", "family": "-", "knob": "-", "value": None, "flops": full_flops,
             "speedup_flops": 1.0, "speedup_measured": 1.0, **quality(full)}]
    skipped = []
    from . import distributed as dist

    # several processes (accelerate launch): each measures every size()-th entry, against its own
    # full-model run; the rows are gathered in entry order
    mine = [(i, e) for i, e in enumerate(entries) if i % dist.size() == dist.rank()]
    done: list[tuple[int, dict]] = []
    for i, e in tqdm(mine, desc="methods", disable=not progress or not dist.is_main()):
        again = next((r for r in resumed or () if r["method"] == e.method and r["value"] == e.value), None)
        if again is not None and "skipped" in again:
            skipped.append(again["skipped"])
            continue
        if again is not None:
            done.append((i, again))
            continue
        try:
            attach = e.prepare(pipe)
            detach = attach(pipe)
        except (PeerUnavailable, soda.BudgetUnreachable) as err:
            # a peer that cannot run here, or a SODA budget beyond its profile's reach: reported, and
            # passed to on_row as a skip record so that a resumed run does not try it again
            why = f"{e.method}: {err}" if isinstance(err, PeerUnavailable) else f"{e.method}: {e.knob}={e.value:g}: {err}"
            skipped.append(why)
            if on_row:
                on_row({"method": e.method, "value": e.value, "skipped": why})
            continue
        try:
            with torch.no_grad():
                images, flops = counted(run, pipe)
        finally:
            detach()
        with torch.no_grad():
            ratios = speedup_pairs(pipe, timed, attach, repeats)
        measured = statistics.median(ratios) if ratios else None
        row = {"method": e.method, "family": e.family, "knob": e.knob, "value": e.value, "flops": flops,
               "speedup_flops": full_flops / flops, "speedup_measured": measured, "ratios": ratios,
               "efficiency": measured * flops / full_flops if measured else None, **quality(images),
               **_runtime_stamp(e)}
        done.append((i, row))
        if on_row:
            on_row(row)
    if dist.size() > 1:
        from accelerate.utils import gather_object

        done = gather_object(done)
        skipped = gather_object(skipped)
    rows += [row for _, row in sorted(done, key=lambda d: d[0])]
    return {"rows": rows, "skipped": skipped, "processes": dist.size()}


def retime(pipe, timed: Callable, entries: list[Entry], rows: list[dict], *, repeats: int = 3,
           progress: bool = True, on_row: Callable[[dict], None] | None = None) -> list[dict]:
    """``rows`` (from an earlier :func:`measure` of these entries, timed on another machine) with
    their speed measured again here, by the same back-to-back pairs with the full model; their
    images, FLOPs and quality are kept, and each records the timing it replaces (``timed_before``).
    A row's entry must rebuild the configuration it was scored with (for SODA: its kept plan)."""
    from tqdm.auto import tqdm

    if repeats < 1:
        raise ValueError(f"retiming needs repeats >= 1, got {repeats}")
    by_key = {(e.method, e.value): e for e in entries}
    missing = [f"{r['method']}={r['value']:g}" for r in rows if (r["method"], r["value"]) not in by_key]
    if missing:
        raise ValueError(f"no configuration to retime {', '.join(missing)} with; pass the sweep they were measured with")
    out = []
    with torch.no_grad():
        if rows:
            timed(pipe)  # warm-up
        for row in tqdm(rows, desc="retime", disable=not progress):
            attach = by_key[(row["method"], row["value"])].prepare(pipe)
            ratios = speedup_pairs(pipe, timed, attach, repeats)
            measured = statistics.median(ratios)
            new = {**row, "speedup_measured": measured, "ratios": ratios,
                   "efficiency": measured / row["speedup_flops"], **_runtime_stamp(by_key[(row["method"], row["value"])]),
                   "timed_before": {k: row.get(k) for k in ("speedup_measured", "ratios", "cpu", "runtime")
                                    if k in row}}
            out.append(new)
            if on_row:
                on_row(new)
    return out


def _runtime_stamp(entry: Entry) -> dict:
    """Our methods' rows say which revision of the runtime executed them (a faster runtime makes
    their timings stale: :func:`stale_timing`)."""
    from .runtime import RUNTIME_REVISION

    return {"runtime": RUNTIME_REVISION} if entry.family == "ours" else {}


def stale_timing(row: dict, cpu: str, dtype=None) -> bool:
    """Whether a measured row's speed should be measured again here: timed on another CPU, or one of
    our methods timed with an older runtime whose speed in ``dtype`` (the benchmark's; None: unknown)
    differs from this one's (rows from before the revision was recorded: 1)."""
    from .runtime import same_speed

    return row.get("cpu") != cpu or (row.get("family") == "ours" and not same_speed(row.get("runtime", 1), dtype))


def merge(old: dict, new: dict) -> dict:
    """``old`` with the rows (and skips) of every method measured in ``new`` replaced by ``new``'s:
    re-measure some methods without re-running the rest.  Rows keep when they were measured."""
    redone = {r["method"] for r in new["rows"]} - {"full"}
    redone |= {s.split(":", 1)[0] for s in new.get("skipped", [])}
    rows = [r for r in old["rows"] if r["method"] == "full" or r["method"] not in redone]
    rows += [r for r in new["rows"] if r["method"] != "full"]
    skipped = [s for s in old.get("skipped", []) if s.split(":", 1)[0] not in redone] + list(new.get("skipped", []))
    return {**old, "rows": rows, "skipped": skipped,
            "merged": [*old.get("merged", []), {"methods": sorted(redone), "total_s": new.get("total_s")}]}


def _name(r: dict) -> str:
    return f"{r['method']} ({r['knob']}={r['value']:g})"


def _soda_points(rows: list[dict], lo: float, hi: float, tol: float) -> list[dict]:
    return [r for r in rows if r["method"] in SODA and r["speedup_measured"] is not None
            and lo * (1 - tol) <= r["speedup_measured"] <= hi * (1 + tol)]


def goal_pairs(rows: list[dict], lo: float = 1.5, hi: float = 3.0, tol: float = 0.05):
    """The comparisons the goal check makes: (SODA row, other row) for each SODA point (either
    budget) in [lo, hi] measured speedup and each other method's row within ``tol`` of its speedup."""
    rows = [r for r in rows if r["speedup_measured"] is not None]
    for s in _soda_points(rows, lo, hi, tol):
        for r in rows:
            if r["method"] not in (*SODA, *ABLATIONS, "full") and abs(r["speedup_measured"] / s["speedup_measured"] - 1) <= tol:
                yield s, r


def goal_check(rows: list[dict], lo: float = 1.5, hi: float = 3.0, tol: float = 0.05) -> list[str]:
    """Where SODA (either budget) is not the best: at each SODA point in [lo, hi] measured speedup,
    the other methods within ``tol`` of its speedup that beat it on PSNR or FD vs the full model."""
    lines = []
    for s, r in goal_pairs(rows, lo, hi, tol):
        worse = [f"PSNR {s['psnr']:.2f} < {r['psnr']:.2f}" if r["psnr"] > s["psnr"] else None,
                 f"FD {s['fd_vs_full']:.2f} > {r['fd_vs_full']:.2f}" if r["fd_vs_full"] < s["fd_vs_full"] else None]
        worse = [w for w in worse if w]
        if worse:
            lines.append(f"{_name(s)} at {s['speedup_measured']:.2f}x vs {_name(r)} at "
                         f"{r['speedup_measured']:.2f}x: " + ", ".join(worse))
    return lines


def curve_at(rows: list[dict], method: str, x: float, keys=("psnr", "fd_vs_full")) -> dict | None:
    """``method``'s ``keys`` at measured speedup ``x``, interpolated linearly between its two timed
    rows that bracket ``x``; None where its rows do not reach ``x``.

    Example::

        curve_at(out["rows"], "fora", 2.0)  # {"psnr": ..., "fd_vs_full": ...} or None
    """
    pts = sorted((r for r in rows if r["method"] == method and r["speedup_measured"] is not None),
                 key=lambda r: r["speedup_measured"])
    pair = next(((a, b) for a, b in zip(pts, pts[1:]) if a["speedup_measured"] <= x <= b["speedup_measured"]), None)
    if pair is None:
        return None
    a, b = pair
    w = (x - a["speedup_measured"]) / max(b["speedup_measured"] - a["speedup_measured"], 1e-12)
    return {k: a[k] + w * (b[k] - a[k]) for k in keys}


def ablation_check(rows: list[dict]) -> list[str]:
    """Each ablation row against SODA's row of the same knob and value (the same budget): the
    PSNR and FD vs the full model of both and which is closer.  Ablation rows without a SODA row
    of their budget are left out.

    Example::

        bench.ablation_check(out["rows"])
        # ["soda-reuse (speedup=2): PSNR 30.00 vs soda's 31.00, FD 9.00 vs 8.00 (soda closer in both)"]
    """
    lines = []
    for a in sorted((r for r in rows if r["method"] in ABLATIONS), key=lambda r: (r["method"], r["value"])):
        s = next((r for r in rows if r["method"] in SODA and r["knob"] == a["knob"] and r["value"] == a["value"]), None)
        if s is None:
            continue
        # per measure, the closer of the two (None: equal, as where both ran the same plan)
        closer = [s["method"] if s["psnr"] > a["psnr"] else a["method"] if a["psnr"] > s["psnr"] else None,
                  s["method"] if s["fd_vs_full"] < a["fd_vs_full"] else a["method"]
                  if a["fd_vs_full"] < s["fd_vs_full"] else None]
        if closer[0] == closer[1]:
            verdict = f"{closer[0]} closer in both" if closer[0] else "equal in both"
        elif None in closer:
            verdict = f"{closer[0] or closer[1]} closer in {'PSNR' if closer[0] else 'FD'}, equal in the other"
        else:
            verdict = f"{s['method']} closer in {'PSNR' if closer[0] == s['method'] else 'FD'}"
        lines.append(f"{_name(a)}: PSNR {a['psnr']:.2f} vs {s['method']}'s {s['psnr']:.2f}, FD {a['fd_vs_full']:.2f} "
                     f"vs {s['fd_vs_full']:.2f} ({verdict})")
    return lines


def curve_check(rows: list[dict], lo: float = 1.5, hi: float = 3.0, tol: float = 0.05) -> list[str]:
    """Where SODA (either budget) is below another method's speed/quality curve: at each SODA point
    in [lo, hi] measured speedup, each other method's PSNR and FD interpolated linearly between its
    two measured points that bracket SODA's speedup (methods that do not reach it are left out)."""
    timed = [r for r in rows if r["speedup_measured"] is not None and r["method"] != "full"]
    lines = []
    for s in _soda_points(timed, lo, hi, tol):
        x = s["speedup_measured"]
        for m in sorted({r["method"] for r in timed} - set(SODA) - set(ABLATIONS)):
            at = curve_at(timed, m, x)
            if at is None:
                continue
            worse = [f"PSNR {s['psnr']:.2f} < {at['psnr']:.2f}" if at["psnr"] > s["psnr"] else None,
                     f"FD {s['fd_vs_full']:.2f} > {at['fd_vs_full']:.2f}" if at["fd_vs_full"] < s["fd_vs_full"] else None]
            worse = [v for v in worse if v]
            if worse:
                lines.append(f"{_name(s)} at {x:.2f}x vs {m}'s curve there: " + ", ".join(worse))
    return lines


def fd_rise(rows: list[dict], at: float = 2.5, key: str = "fd_vs_test") -> list[str]:
    """For each SODA budget, how much its FD vs real data at about ``at`` x measured speedup exceeds
    the full model's (goal: at most 10%); none without that column or without a timed row within
    20% of ``at``."""
    full = next((r for r in rows if r["method"] == "full"), None)
    if full is None or key not in full:
        return []
    out = []
    for method in SODA:
        points = [r for r in rows if r["method"] == method and r["speedup_measured"] is not None]
        if not points:
            continue
        s = min(points, key=lambda r: abs(r["speedup_measured"] - at))
        if abs(s["speedup_measured"] / at - 1) > 0.2:
            continue  # no point near that speed
        change = s[key] / full[key] - 1
        out.append(f"{method}'s FD vs real data at {at:g}x (its point nearest {at:g}x: {s['knob']}={s['value']:g}, "
                   f"{s['speedup_measured']:.2f}x measured): {s[key]:.2f} vs the full model's {full[key]:.2f}, "
                   f"{100 * change:+.1f}% (goal: at most +10%).")
    return out


EXTRA_COLUMNS = {"fd_vs_test": ("FD vs real test", "{:.2f}"), "class_agreement": ("classifier agreement", "{:.1%}")}


def report(out: dict) -> str:
    """Markdown table of ``measure``'s rows (sorted by method, then speed), the goal check and
    ``out["description"]`` / ``out["command"]`` if present."""
    rows = out["rows"]
    extras = [k for k in EXTRA_COLUMNS if k in rows[0]]
    head = ["method", "knob", "measured speedup", "FLOP speedup", "efficiency", "PSNR vs full", "SSIM vs full",
            "FD vs full", *(EXTRA_COLUMNS[k][0] for k in extras)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in sorted(rows, key=lambda r: (r["method"] != "full", r["method"], r["speedup_measured"] or r["speedup_flops"])):
        ext = [EXTRA_COLUMNS[k][1].format(r[k]) for k in extras]
        if r["method"] == "full":
            cells = ["full", "-", "1.00x", "1.00x", "-", "-", "-", "-"]
        else:
            timed = r["speedup_measured"] is not None
            cells = [f"{r['method']} ({r['family']})", f"{r['knob']}={r['value']:g}",
                     f"{r['speedup_measured']:.2f}x" if timed else "-", f"{r['speedup_flops']:.2f}x",
                     f"{100 * r['efficiency']:.0f}%" if timed else "-", f"{r['psnr']:.2f}",
                     f"{r['ssim']:.4f}", f"{r['fd_vs_full']:.2f}"]
        lines.append("| " + " | ".join(cells + ext) + " |")
    caption = (out.get("description", "") + " ").lstrip()
    if not any(r["method"] != "full" and r["speedup_measured"] is not None for r in rows):
        # a fidelity-only run (repeats=0) has no measured speedups to match: nothing to check
        lines += ["", caption + "Goal check: not made (no speed was measured: a fidelity-only run).", ""]
    else:
        misses = goal_check(rows)
        lines += ["", caption + "Goal check (SODA, under either budget, best in PSNR and FD vs full at every matched measured "
                  "speedup 1.5-3x, ±5%): "
                  + ("met." if not misses else f"{len(misses)} misses:"), ""]
        lines += [f"- {m}" for m in misses]
        below = curve_check(rows)
        lines += ["", "Against each method's curve at SODA's measured speedups 1.5-3x (linear interpolation "
                  "between the method's two measured points around it): "
                  + ("SODA is on or above every curve." if not below else f"{len(below)} places below:"), ""]
        lines += [f"- {m}" for m in below]
    ablation = ablation_check(rows)
    if ablation:
        lines += ([] if lines[-1] == "" else [""]) + ["Ablation, at the same budget (the profile before it measured "
                                                     "the fillers and the images' sensitivity, vs SODA's):", ""]
        lines += [f"- {m}" for m in ablation] + [""]
    rise = fd_rise(rows)
    if rise:
        lines += ([] if lines[-1] == "" else [""]) + rise
    lines += [f"- skipped {s}" for s in out.get("skipped", [])]
    if out.get("command"):
        lines += ["", f"Generated by `{out['command']}`."]
    return "\n".join(lines)


def plot(out: dict, path, title: str = "") -> None:
    """Pareto plots: PSNR and FD vs the full model against measured speedup, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    methods = sorted({r["method"] for r in out["rows"]} - {"full"})
    markers = {"ours": "o", "diffusers": "s", "cache-dit": "^"}
    colors = plt.cm.tab20(range(20))
    for i, m in enumerate(methods):
        pts = sorted((r for r in out["rows"] if r["method"] == m), key=lambda r: r["speedup_measured"])
        style = dict(marker=markers.get(pts[0]["family"], "o"), color=colors[i % 20],
                     lw=2.5 if m.startswith("soda") else 1.2, ms=6 if m.startswith("soda") else 4)
        for ax, key in zip(axes, ("psnr", "fd_vs_full")):
            ax.plot([r["speedup_measured"] for r in pts], [r[key] for r in pts], label=m, **style)
    axes[0].set_ylabel("PSNR vs full model (dB)")
    axes[1].set_ylabel("Fréchet distance vs full model")
    axes[1].set_yscale("log")
    for ax in axes:
        ax.set_xlabel("measured wall-clock speedup")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, ncol=2, title="o ours, ■ diffusers, ▲ cache-dit", title_fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
