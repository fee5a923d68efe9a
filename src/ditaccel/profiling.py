"""SODA's offline sensitivity profile (OFS): how much error caching and partial recompute would
cause at every (step, layer, module), measured along real full-model sampling trajectories, and
what each module costs (FLOPs exactly, latency on this machine).

For every step ``t``, layer ``l``, module ``m`` and candidate cache age ``n`` (the step the cache
was filled at is ``t - n``):

- cache error ``E_c = 1 - cos(out_t, out_{t-n})`` over each sample's flattened (tokens x channels)
  output, averaged over samples (its standard deviation over samples is kept too);
- prune error ``E_p(rho, score) = 1 - cos(out_t, mix)``, ``mix`` = the cached output with the
  fraction ``rho`` of tokens ranked highest by the token score replaced by fresh ones.  No extra
  forward pass: with per-token dot products and squared norms, every ``rho`` comes from cumulative
  sums along the score ranking;
- forecast error ``E_f = 1 - cos(out_t, y_a + n/g (y_a - y_b))`` for the first-order forecast the
  runtime runs (``Plan.forecast``) from the outputs at ``a = t - n`` and ``b = a - g``, for every
  gap ``g`` from 1 to ``max(intervals) + 1`` (the longest segment between full steps): from the
  dot products of the fresh output with each kept one and of the kept ones with each other, no
  forecast is formed.

With ``ProfileConfig(error="relative")`` each ``1 - cos(out_t, approx)`` above is the squared
distance relative to the fresh output instead, ``|out_t - approx|^2 / |out_t|^2``, from the same dot
products (it also sees an approximation whose magnitude is off); ``meta["error"]`` says which.

Only a ring of the last ``2 max(intervals) + 1`` outputs (and inputs, for the ``delta`` score) per
(branch, layer, module) is kept; whole trajectories never are.
"""

from __future__ import annotations

import math
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from diffusers.hooks import HookRegistry, ModelHook
from tqdm import tqdm

from . import io
from .plan import FULL, REUSE, TOKEN_SCORES, Plan, full_plan
from .registry import DTYPES

KIND = "profile"
PARTIAL_KIND = "profile-partial"
DEFAULT_INTERVALS = (1, 2, 3, 4, 5)  # the cache ages profiled for up to 125 steps
DEFAULT_RATIOS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75)
ERRORS = ("cosine", "relative")  # 1 - cos(fresh, approx); |fresh - approx|^2 / |fresh|^2


class ProfileError(ValueError):
    pass


def forecast_gaps(intervals) -> tuple[int, ...]:
    """The gaps between a forecast's two full outputs that a profile with these cache ages
    measures: 1 to the longest segment between full steps, ``max(intervals) + 1``."""
    return tuple(range(1, max(intervals) + 2))


@dataclass(frozen=True, eq=False)
class Profile:
    e_cache: torch.Tensor       # (T, L, M, I) mean over samples; NaN where t - n < 0
    e_cache_std: torch.Tensor   # (T, L, M, I) standard deviation over samples
    e_prune: torch.Tensor       # (T, L, M, I, R, S) for ratios R and token scores S
    module_flops: torch.Tensor  # (L, M, R + 1) FLOPs per sample row at k = ratio * N tokens; last: all
    module_ms: torch.Tensor     # (M, R + 1) measured ms per call of one layer's module (timing batch)
    step_flops: float           # FLOPs of a full transformer call per sample row
    step_ms: float              # measured ms of a full transformer call (timing batch)
    reuse_ms: float             # measured ms of a call that reuses every module (timing batch)
    meta: dict[str, Any] = field(default_factory=dict)
    # measured ms (timing batch) a reusing step costs beyond ``reuse_ms`` once any module computes
    # on it: the step then runs its blocks one by one instead of as one collapsed sum
    # (runtime.collapse); 0 in profiles made before it was measured (their module_ms hold it,
    # spread over the layers)
    decollapse_ms: float = 0.0
    # (T, L, M, I, G) mean first-order forecast error at age I from the full outputs at t - n and
    # t - n - g, gaps g = 1..max(intervals) + 1; NaN where a step is missing; None in profiles
    # made before forecasts were profiled (planned with reuse only)
    e_forecast: torch.Tensor | None = None
    # (T,) how much the sampled images move (mean squared difference per pixel, images in [0, 1])
    # when the model's output at step t is replaced by its output at step t - 1, everything else
    # computed: measured at some steps (:func:`sensitivity_steps`), NaN at the others; None in
    # profiles made without it (planned unweighted)
    step_sensitivity: torch.Tensor | None = None
    # (T,) the same swaps' structural dissimilarity, 1 - SSIM (metrics.ssim_per_image, mean over the
    # images): the late steps, which set fine detail, move it far more than their pixel error says;
    # None in profiles made before it was measured
    step_structure: torch.Tensor | None = None
    # measured ms (timing batch) of a collapsed call that forecasts every module from two earlier
    # full outputs (two cached outputs streamed per module, not one); None in profiles made before
    # it was measured (priced as reuse_ms)
    forecast_ms: float | None = None
    # FLOPs per sample row of a call that reuses every module (collapsed: SD3's text stream, for
    # one, is not computed then); None in profiles made before it was counted (priced as a call
    # that runs its blocks with every module reused, ``step_flops`` less the modules')
    reuse_flops: float | None = None

    @property
    def gaps(self) -> tuple[int, ...]:
        """The gaps between the two full outputs a forecast reads that ``e_forecast`` holds."""
        return forecast_gaps(self.intervals)

    # -- shape --------------------------------------------------------------------------------
    @property
    def modules(self) -> tuple[str, ...]:
        return tuple(self.meta["modules"])

    @property
    def intervals(self) -> tuple[int, ...]:
        return tuple(self.meta["intervals"])

    @property
    def ratios(self) -> tuple[float, ...]:
        return tuple(self.meta["ratios"])

    @property
    def token_scores(self) -> tuple[str, ...]:
        return tuple(self.meta["token_scores"])

    @property
    def num_steps(self) -> int:
        return int(self.e_cache.shape[0])

    @property
    def num_layers(self) -> int:
        return int(self.e_cache.shape[1])

    @property
    def num_tokens(self) -> int:
        return int(self.meta["num_tokens"])

    def tokens_for_ratio(self, ratio: float) -> int:
        return max(1, min(self.num_tokens - 1, round(ratio * self.num_tokens)))

    # -- checks -------------------------------------------------------------------------------
    def check_for(self, *, fingerprint: str | None = None, sampler: str | None = None,
                  num_steps: int | None = None) -> None:
        """Refuse to plan for another model, sampler or step count."""
        if fingerprint is not None and self.meta.get("fingerprint") not in (None, fingerprint):
            raise ProfileError("this profile was made for another model (fingerprint differs); "
                               "profile this model with `ditaccel profile`")
        if sampler is not None and self.meta.get("sampler") not in (None, sampler):
            raise ProfileError(f"this profile was made with the {self.meta.get('sampler')} sampler, "
                               f"not {sampler}; profile with --sampler {sampler}")
        if num_steps is not None and num_steps != self.num_steps:
            raise ProfileError(f"this profile is for {self.num_steps} sampling steps, not {num_steps}; "
                               f"profile with --steps {num_steps}")

    def variation(self) -> dict[str, float]:
        """How much the cache error varies across samples: median over (t, l, m, n) of the
        coefficient of variation std / mean, and its 90th percentile."""
        ok = torch.isfinite(self.e_cache) & (self.e_cache > 0)
        cv = (self.e_cache_std[ok] / self.e_cache[ok]).float()
        if cv.numel() == 0:
            return {"cv_median": float("nan"), "cv_p90": float("nan")}
        return {"cv_median": float(cv.median()), "cv_p90": float(cv.quantile(0.9))}

    # -- artifact -----------------------------------------------------------------------------
    def save(self, stem: str | Path) -> None:
        tensors = {"e_cache": self.e_cache, "e_cache_std": self.e_cache_std, "e_prune": self.e_prune,
                   "module_flops": self.module_flops, "module_ms": self.module_ms}
        if self.e_forecast is not None:
            tensors["e_forecast"] = self.e_forecast
        for name in ("step_sensitivity", "step_structure"):
            if getattr(self, name) is not None:
                tensors[name] = getattr(self, name)
        meta = {**self.meta, "step_flops": self.step_flops, "step_ms": self.step_ms,
                "reuse_ms": self.reuse_ms, "decollapse_ms": self.decollapse_ms,
                **({} if self.forecast_ms is None else {"forecast_ms": self.forecast_ms}),
                **({} if self.reuse_flops is None else {"reuse_flops": self.reuse_flops})}
        io.save_artifact(stem, KIND, tensors, meta)

    @classmethod
    def load(cls, stem: str | Path) -> "Profile":
        stem = Path(stem)
        if not io.artifact_exists(stem):
            raise ProfileError(f"no profile at {stem} (expected {stem}.json and {stem}.safetensors); "
                               "make one with `ditaccel profile --out STEM`")
        tensors, meta = io.load_artifact(stem, KIND)
        forecast_ms = meta.pop("forecast_ms", None)
        reuse_flops = meta.pop("reuse_flops", None)
        try:
            prof = cls(e_cache=tensors["e_cache"], e_cache_std=tensors["e_cache_std"],
                       e_prune=tensors["e_prune"], module_flops=tensors["module_flops"],
                       module_ms=tensors["module_ms"], step_flops=float(meta.pop("step_flops")),
                       step_ms=float(meta.pop("step_ms")), reuse_ms=float(meta.pop("reuse_ms")),
                       decollapse_ms=float(meta.pop("decollapse_ms", 0.0)),
                       forecast_ms=None if forecast_ms is None else float(forecast_ms),
                       reuse_flops=None if reuse_flops is None else float(reuse_flops),
                       meta=meta, e_forecast=tensors.get("e_forecast"),
                       step_sensitivity=tensors.get("step_sensitivity"),
                       step_structure=tensors.get("step_structure"))
        except KeyError as e:
            raise ProfileError(f"profile {stem} is missing {e.args[0]!r}; regenerate it") from None
        except (TypeError, ValueError):
            raise ProfileError(f"profile {stem}: step_flops/step_ms/reuse_ms are not numbers; "
                               "regenerate it") from None
        problem = prof.problem()
        if problem:
            raise ProfileError(f"profile {stem}: {problem}; regenerate it with `ditaccel profile`")
        return prof

    def problem(self) -> str | None:
        """What makes this profile unusable (shapes that disagree, NaN where a value was
        measured, Inf or negative errors), or None."""
        try:
            t, l, m, i = self.e_cache.shape
            shape = (len(self.modules), len(self.intervals), len(self.ratios), len(self.token_scores))
            self.num_tokens
        except (KeyError, TypeError, ValueError):
            return "its metadata lacks modules/intervals/ratios/token_scores/num_tokens or the error table is not 4-D"
        if (m, i) != shape[:2] or tuple(self.e_cache_std.shape) != (t, l, m, i) \
                or tuple(self.e_prune.shape) != (t, l, m, i, *shape[2:]) \
                or tuple(self.module_flops.shape) != (l, m, shape[2] + 1) \
                or tuple(self.module_ms.shape) != (m, shape[2] + 1):
            return "its tables' shapes disagree with each other or with its metadata"
        if self.e_forecast is not None and tuple(self.e_forecast.shape) != (t, l, m, i, len(self.gaps)):
            return "its forecast error table's shape disagrees with its other tables"
        if any(x is not None and tuple(x.shape) != (t,) for x in (self.step_sensitivity, self.step_structure)):
            return "its step sensitivity's length differs from its step count"
        for name in ("e_cache", "e_cache_std", "e_prune", "module_flops", "module_ms", "e_forecast",
                     "step_sensitivity", "step_structure"):
            x = getattr(self, name)
            if x is None:
                continue
            if torch.isinf(x).any() or (x < 0).any():
                return f"{name} has infinite or negative values"
        steps = torch.arange(t)[:, None]
        measurable = steps >= torch.tensor(self.intervals)[None, :]  # (T, I): t - n >= 0
        if torch.isnan(self.e_cache).permute(0, 3, 1, 2)[measurable].any():
            return "e_cache has NaN where a cache error was measured"
        if torch.isnan(self.module_flops).any() or not (math.isfinite(self.step_flops) and self.step_flops > 0):
            return "its FLOP counts are missing or not finite"
        if not (math.isfinite(self.decollapse_ms) and self.decollapse_ms >= 0):
            return "its decollapse_ms is not a finite number >= 0"
        return None


# ------------------------------------------------------------------------------------------------
# Recording the errors


def _image_part(t, text_prefix: bool, n: int) -> torch.Tensor:
    if isinstance(t, tuple):
        t = t[0]
    return t[:, t.shape[1] - n:] if text_prefix else t


class _Recorder:
    """Forward hooks on every module; accumulates error sums per (t, l, m, n, ...)."""

    def __init__(self, state, shape, intervals, ratios, scores, keep_inputs: bool, error: str = "cosine"):
        self.state, self.intervals, self.scores, self.error = state, intervals, scores, error
        t, l, m, i, r, s = (shape.num_steps, shape.num_layers, len(shape.modules), len(intervals),
                            len(ratios), len(scores))
        self.n = shape.num_tokens
        self.ks = torch.tensor([max(1, min(self.n - 1, round(x * self.n))) for x in ratios])
        self.sum_c = torch.zeros(t, l, m, i, dtype=torch.float64)
        self.sq_c = torch.zeros(t, l, m, i, dtype=torch.float64)
        self.cnt = torch.zeros(t, l, m, i, dtype=torch.float64)
        self.sum_p = torch.zeros(t, l, m, i, r, s, dtype=torch.float64)
        self.gaps = forecast_gaps(intervals)
        self.sum_f = torch.zeros(t, l, m, i, len(self.gaps), dtype=torch.float64)
        self.cnt_f = torch.zeros(t, l, m, i, len(self.gaps), dtype=torch.float64)
        self.depth = max(intervals) + max(self.gaps)  # how far back a forecast reads
        self.keep_inputs = keep_inputs
        self.rings: dict[tuple, dict[int, tuple[torch.Tensor, torch.Tensor | None]]] = {}
        self.handles = []

    def attach(self, modules: list[tuple[int, int, torch.nn.Module, bool]]) -> None:
        for layer, mi, module, text_prefix in modules:
            self.handles.append(module.register_forward_hook(
                self._hook(layer, mi, text_prefix), with_kwargs=True))

    def detach(self) -> None:
        for h in self.handles:
            h.remove()
        self.rings.clear()

    def _hook(self, layer: int, mi: int, text_prefix: bool):
        def hook(module, args, kwargs, output):
            st = self.state
            if st.step < 0:
                return
            x = args[0] if args else kwargs["hidden_states"]
            out = _image_part(output, text_prefix, self.n).detach()
            inp = _image_part(x, text_prefix, self.n).detach() if self.keep_inputs else None
            ring = self.rings.setdefault((st.branch, layer, mi), {})
            ring[st.step] = self._measure(st.step, layer, mi, out, inp, ring)
            for old in [s for s in ring if s <= st.step - self.depth]:
                del ring[old]
        return hook

    def _on(self, device: torch.device) -> None:
        """Keep the sums where the activations are (no host sync per measurement on a GPU)."""
        if self.sum_c.device != device:
            for name in (*self.SUMS, "ks"):
                setattr(self, name, getattr(self, name).to(device))

    @torch.no_grad()
    def _measure(self, t, layer, mi, out, inp, ring) -> tuple:
        """Add step ``t``'s errors against the kept outputs; returns the ring's entry for this
        output: ``(out, inp, norms, pairs, tok_sq)``, its squared norm per sample and its dot
        products with the kept outputs (float64, (B,)), and its squared norm per token (B, N)."""
        self._on(out.device)
        fresh = out.float()
        f = fresh.pow(2).sum(-1)                         # (B, N) |fresh_i|^2 (kept by the ring)
        f_tot = f.sum(1)
        # per token and sample: <fresh, y_s> for every kept earlier step s of this trajectory (the
        # cache errors' and forecasts' inputs; the ring may still hold later steps of the
        # trajectory before)
        tok_dots = {s: (fresh * entry[0].float()).sum(-1) for s, entry in ring.items() if s < t}
        dots = {s: d.sum(1).double() for s, d in tok_dots.items()}
        self._forecast_errors(t, layer, mi, f_tot.double(), dots, ring)
        # every profiled age whose output the ring holds, at once: (I, B, ...) stacks
        ages = [(ii, t - n) for ii, n in enumerate(self.intervals) if t - n in ring]
        if not ages:
            return out, inp, f_tot.double(), dots, f
        at = torch.tensor([ii for ii, _ in ages], device=f.device)
        d = torch.stack([tok_dots[s] for _, s in ages])                  # (I, B, N) <fresh_i, cached_i>
        c = torch.stack([ring[s][4] for _, s in ages])                   # (I, B, N) |cached_i|^2
        d_tot, c_tot = torch.stack([dots[s] for _, s in ages]).float(), c.sum(2)   # (I, B)
        # 1 - cosine is >= 0 (Cauchy-Schwarz); fp32 rounding can put an unchanged output a
        # hair below 0, which the artifact check rightly refuses
        e_c = self._err(f_tot, d_tot, c_tot)                             # (I, B)
        self.sum_c[t, layer, mi, at] += e_c.sum(1).double()
        self.sq_c[t, layer, mi, at] += e_c.pow(2).sum(1).double()
        self.cnt[t, layer, mi, at] += e_c.shape[1]
        k = self.ks - 1
        for si, score in enumerate(self.scores):
            if score == "delta":  # how far each token's input moved since the cached step
                x = inp.float()
                moved = torch.stack([torch.linalg.vector_norm(x - ring[s][1].float(), dim=-1) for _, s in ages])
                order = moved.argsort(dim=2, descending=True)            # (I, B, N) highest score first
                cf = f.expand_as(d).gather(2, order).cumsum(2)           # fresh tokens' |.|^2 in that order
            else:  # feature_mean: does not depend on the cached step (one order for every age)
                x = inp.float() if inp is not None else fresh
                moved = torch.linalg.vector_norm(x - x.mean(dim=1, keepdim=True), dim=-1)
                order = moved.argsort(dim=1, descending=True)
                cf = f.gather(1, order).cumsum(1).expand_as(d)
                order = order.expand_as(d)
            cd = d.gather(2, order).cumsum(2)
            cc = c.gather(2, order).cumsum(2)
            dot = cf[..., k] + (d_tot[..., None] - cd[..., k])           # (I, B, R)
            mix = cf[..., k] + (c_tot[..., None] - cc[..., k])
            e_p = self._err(f_tot[:, None], dot, mix)
            self.sum_p[t, layer, mi, at, :, si] += e_p.sum(1).double()
        return out, inp, f_tot.double(), dots, f

    def _forecast_errors(self, t, layer, mi, f_tot, dots, ring) -> None:
        """``E_f`` for every (age n, gap g) whose two outputs the ring holds: the forecast
        ``(1 + w) y_a - w y_b`` with ``w = n / g``, its dot product with the fresh output and its
        squared norm expanded in the kept dot products (all pairs at once)."""
        pairs = [(ii, gi, t - n, t - n - g, n / g) for ii, n in enumerate(self.intervals) if t - n in ring
                 for gi, g in enumerate(self.gaps) if t - n - g in ring[t - n][3]]
        if not pairs:
            return
        ii, gi = (torch.tensor(x, device=f_tot.device) for x in zip(*(p[:2] for p in pairs)))
        w = torch.tensor([p[4] for p in pairs], dtype=f_tot.dtype, device=f_tot.device)[:, None]   # (P, 1)
        dot_a, dot_b = (torch.stack([dots[p[i]] for p in pairs]) for i in (2, 3))                  # (P, B)
        c_a, c_b = (torch.stack([ring[p[i]][2] for p in pairs]) for i in (2, 3))
        ab = torch.stack([ring[p[2]][3][p[3]] for p in pairs])
        dot = (1 + w) * dot_a - w * dot_b
        sq = ((1 + w) ** 2 * c_a - 2 * w * (1 + w) * ab + w ** 2 * c_b).clamp_min(0)
        e_f = self._err(f_tot, dot, sq)
        self.sum_f[t, layer, mi, ii, gi] += e_f.sum(1)
        self.cnt_f[t, layer, mi, ii, gi] += e_f.shape[1]

    def _err(self, f, d, a):
        """The error of an approximation from its squared norm ``a``, the fresh output's ``f`` and
        their dot product ``d``: ``1 - cos`` (>= 0 by Cauchy-Schwarz; fp32 rounding can put an
        unchanged output a hair below 0, which the artifact check rightly refuses, or an opposite
        one above 2) or the squared distance relative to the fresh output, ``(f - 2 d + a) / f``."""
        if self.error == "cosine":
            return (1 - d / (f * a).sqrt().clamp_min(1e-30)).clamp(0, 2)
        f, d, a = f.double(), d.double(), a.double()  # a small difference of large sums
        return ((f - 2 * d + a) / f.clamp_min(1e-30)).clamp_min(0)

    SUMS = ("sum_c", "sq_c", "cnt", "sum_p", "sum_f", "cnt_f")

    def sums(self) -> dict[str, torch.Tensor]:
        """The error sums, on the CPU."""
        return {name: getattr(self, name).cpu() for name in self.SUMS}

    def load_sums(self, tensors: dict[str, torch.Tensor]) -> None:
        for name in self.SUMS:
            if name not in tensors or tensors[name].shape != getattr(self, name).shape:
                raise ProfileError("the partial profile's tables do not fit these settings; delete it")
            setattr(self, name, tensors[name].double().clone())

    def tables(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean cache error, its standard deviation over samples, mean prune and forecast errors."""
        self._on(torch.device("cpu"))
        cnt = self.cnt
        mean = torch.where(cnt > 0, self.sum_c / cnt.clamp_min(1), torch.nan)
        var = torch.where(cnt > 1, (self.sq_c - cnt * mean.nan_to_num() ** 2) / (cnt - 1).clamp_min(1), torch.nan)
        std = var.clamp_min(0).sqrt()
        p = torch.where(cnt[..., None, None] > 0, self.sum_p / cnt[..., None, None].clamp_min(1), torch.nan)
        f = torch.where(self.cnt_f > 0, self.sum_f / self.cnt_f.clamp_min(1), torch.nan)
        return mean.float(), std.float(), p.float(), f.float()


# ------------------------------------------------------------------------------------------------
# Resuming an interrupted profile


def _save_partial(stem, settings: dict, sums: dict[str, torch.Tensor], captured: dict, done: int) -> None:
    tensors = {f"sums.{k}": v for k, v in sums.items()}
    extra = {}
    if "inputs" in captured:
        args, kwargs = captured["inputs"]
        values = {}
        for i, a in enumerate(args):
            if torch.is_tensor(a):
                tensors[f"arg.{i}"] = a
        for k, v in kwargs.items():
            if torch.is_tensor(v):
                tensors[f"kw.{k}"] = v
            else:
                values[k] = v
        extra = {"args": _jsonable({str(i): None if torch.is_tensor(a) else a for i, a in enumerate(args)}),
                 "kwargs": _jsonable(values)}
    io.save_artifact(stem, PARTIAL_KIND, tensors, {"settings": settings, "done": done, "captured": extra or None})


def _jsonable(kwargs: dict) -> dict:
    import json

    out = {}
    for k, v in kwargs.items():
        try:
            json.dumps(v)
        except (TypeError, ValueError):
            raise ProfileError(f"cannot checkpoint the transformer argument {k!r} ({type(v).__name__}); "
                               "profile without a checkpoint") from None
        out[k] = v
    return out


def _resume(stem, settings: dict, rec: _Recorder, captured: dict) -> int:
    try:
        tensors, meta = io.load_artifact(stem, PARTIAL_KIND)
    except io.ArtifactError as e:
        files = f"{stem}.safetensors and {stem}.json"
        raise ProfileError(f"the checkpoint of an interrupted profile cannot be read ({str(e).split('; ')[0]}); "
                           f"delete {files} (or run `ditaccel profile` with --restart) to start over") from None
    if meta.get("settings") != settings:
        theirs = meta.get("settings") or {}
        diff = sorted(k for k in settings if theirs.get(k) != settings[k])
        raise ProfileError(f"the partial profile {stem} was made with other settings ({', '.join(diff)}); "
                           "run with the same settings to resume, or delete it (`ditaccel profile --restart`) to start over")
    rec.load_sums({k[5:]: v for k, v in tensors.items() if k.startswith("sums.")})
    cap = meta.get("captured")
    if cap:
        args = tuple(tensors.get(f"arg.{i}", cap["args"][str(i)]) for i in range(len(cap["args"])))
        kwargs = {**cap["kwargs"], **{k[3:]: v for k, v in tensors.items() if k.startswith("kw.")}}
        captured["inputs"] = (args, kwargs)
    return int(meta["done"])


# ------------------------------------------------------------------------------------------------
# Measuring module costs


def _uniform_plan(shape, steps: int, fill_role: dict[str, int]) -> Plan:
    """A two-step plan: an anchor, then a step where each role gets its token count (FULL,
    REUSE or k) in every layer."""
    tokens = torch.full((steps, shape.num_layers, len(shape.modules)), FULL)
    for mi, role in enumerate(shape.modules):
        tokens[1:, :, mi] = fill_role.get(role, REUSE)
    anchors = torch.zeros(steps, dtype=torch.bool)
    anchors[0] = True
    return Plan(num_tokens=shape.num_tokens, modules=shape.modules, anchors=anchors, tokens=tokens,
                token_score="feature_mean")


def _batch_rows(x, rows: int, keep: int):
    """``x`` (a call's argument: tensor, tuple, list or dict of them) with every tensor whose
    first dimension is the call's ``rows`` cut to its first ``keep`` rows."""
    if torch.is_tensor(x):
        return x[:keep] if x.dim() and x.shape[0] == rows else x
    if isinstance(x, (tuple, list)):
        return type(x)(_batch_rows(v, rows, keep) for v in x)
    if isinstance(x, dict):
        return {k: _batch_rows(v, rows, keep) for k, v in x.items()}
    return x


def _output_tensor(out) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else getattr(out, "sample", out)


FLOP_ROWS = 2  # the rows measure_costs counts FLOPs on, where the call can be cut by rows


@torch.no_grad()
def measure_costs(transformer, shape, ratios, call_inputs: tuple[tuple, dict], repeats: int = 5,
                  progress: bool = True, timing_rows: int | None = 16) -> dict[str, Any]:
    """FLOPs (per module and layer, per sample row) and latency (per role, averaged over layers)
    of partial recompute at every ratio, measured through the runtime itself on a captured
    transformer call's inputs.  With ``timing_rows`` (default 16: eight images with guidance, the
    batch ``ditaccel bench`` times) smaller than the call's batch, the times are taken on its first
    ``timing_rows`` rows and the FLOPs (per row, the same at any batch) counted on its first
    ``FLOP_ROWS``, once the cut call is checked to give those rows' output of the whole call (else
    both on the whole call); ``None`` times the whole call.  Returns the
    tables and ``timing_rows``, the rows the times are for."""
    from .metrics import flop_counter
    from .runtime import apply, remove, state_of
    from .runtime.adapters import block_modules, find_blocks

    from .devices import synchronize

    dev = transformer.device  # a resumed profile's captured call comes from the CPU
    args, kwargs = call_inputs
    args = tuple(a.to(dev) if torch.is_tensor(a) else a for a in args)
    kwargs = {k: (v.to(dev) if torch.is_tensor(v) else v) for k, v in kwargs.items()}
    rows = int((args[0] if args else kwargs["hidden_states"]).shape[0])
    # FLOPs per row are the same at any batch: where the call can be cut by rows (checked below),
    # they are counted on FLOP_ROWS rows (counting runs every counted call in full)
    flop_args, flop_kwargs, flop_rows = args, kwargs, rows
    if timing_rows is not None and 0 < timing_rows < rows:
        whole = _output_tensor(transformer(*args, **kwargs))
        cut_args, cut_kwargs = _batch_rows(args, rows, timing_rows), _batch_rows(kwargs, rows, timing_rows)
        try:
            cut = _output_tensor(transformer(*cut_args, **cut_kwargs)).float()
            ref = whole[:timing_rows].float()
            same = cut.shape == ref.shape and bool((cut - ref).norm() <= 1e-2 * ref.norm() + 1e-12)
        except Exception:  # an input whose first dimension is not the batch: time the whole call
            same = False
        del whole
        if same:
            args, kwargs, rows = cut_args, cut_kwargs, timing_rows
            flop_rows = min(rows, FLOP_ROWS)
            flop_args, flop_kwargs = _batch_rows(args, rows, flop_rows), _batch_rows(kwargs, rows, flop_rows)
    full = flop_counter()
    with full:
        transformer(*flop_args, **flop_kwargs)
    step_flops = full.get_total_flops() / flop_rows
    ks = [max(1, min(shape.num_tokens - 1, round(r * shape.num_tokens))) for r in ratios] + [FULL]
    names = {}
    for layer, (name, block, spec) in enumerate(find_blocks(transformer)):
        for role, module in block_modules(block, spec).items():
            if role in shape.modules:
                names[(layer, role)] = module
    fqn = {m: n for n, m in transformer.named_modules()}

    def counted(plan):
        """FLOPs of the second call of ``plan`` (the first, an anchor, fills the caches)."""
        apply(transformer, plan, check_fingerprint=False)
        t = flop_kwargs.get("timestep")
        try:
            transformer(*flop_args, **{**flop_kwargs, "timestep": t})
            with flop_counter() as counter:
                transformer(*flop_args, **{**flop_kwargs, "timestep": t - 1})
            return counter
        finally:
            remove(transformer)

    flops = torch.zeros(shape.num_layers, len(shape.modules), len(ks), dtype=torch.float64)
    for ki, k in enumerate(ks):
        counter = counted(_uniform_plan(shape, 2, {r: k for r in shape.modules}))
        per_module = counter.get_flop_counts()
        for (layer, role), module in names.items():
            key = _flop_key(per_module, fqn[module], type(transformer).__name__)
            flops[layer, shape.modules.index(role), ki] = sum(per_module.get(key, {}).values()) / flop_rows
    # a step reusing every module (collapsed where the blocks allow: SD3's skips its text stream)
    reuse_flops = counted(_uniform_plan(shape, 2, {})).get_total_flops() / flop_rows

    # latency: per role, the extra time over a step that reuses everything.  One trajectory per
    # repeat: two anchors, then one step per job, all reading the second anchor's caches; the last
    # job forecasts every module from both anchors' outputs instead of reusing them.
    jobs = ([("reuse", None, None)] + [(role, ki, k) for role in shape.modules for ki, k in enumerate(ks)]
            + [("forecast", None, None)])
    tokens = torch.full((len(jobs) + 2, shape.num_layers, len(shape.modules)), REUSE)
    tokens[:2] = FULL
    for i, (role, _, k) in enumerate(jobs, start=2):
        if role not in ("reuse", "forecast"):
            tokens[i, :, shape.modules.index(role)] = k
    anchors = torch.zeros(len(jobs) + 2, dtype=torch.bool)
    anchors[:2] = True
    fill = torch.zeros_like(tokens, dtype=torch.int32)
    fill[-1] = 1
    timing_plan = Plan(num_tokens=shape.num_tokens, modules=shape.modules, anchors=anchors,
                       tokens=tokens, token_score="feature_mean", fill=fill)
    times: dict[tuple, list[float]] = {(role, ki): [] for role, ki, _ in jobs}
    full_times = []
    t = kwargs.get("timestep")
    def trajectory(calls: int, collapse: bool = True) -> list:
        """The records of the timing plan's first ``calls`` steps (collapse off: the reusing step
        run block by block, as any step on which a module computes is)."""
        apply(transformer, timing_plan, check_fingerprint=False, collapse=collapse)
        try:
            for i in range(calls):
                transformer(*args, **{**kwargs, "timestep": t - i})
            return state_of(transformer).records
        finally:
            remove(transformer)

    # what computing a module costs on top of the block-by-block reusing step is the module's; what
    # that step costs beyond the collapsed one is paid once per step on which any module computes
    apart = []
    for _ in tqdm(range(repeats), desc="module costs", disable=not progress):
        recs = trajectory(len(jobs) + 2)
        for (role, ki, _), rec in zip(jobs, recs[2:]):
            times[(role, ki)].append(rec.wall_s)
        apart.append(trajectory(3, collapse=False)[2].wall_s)
        synchronize(dev)
        t0 = time.perf_counter()
        transformer(*args, **kwargs)
        synchronize(dev)
        full_times.append(time.perf_counter() - t0)
    reuse = statistics.median(times[("reuse", None)])
    uncollapsed = statistics.median(apart)
    ms = torch.zeros(len(shape.modules), len(ks), dtype=torch.float64)
    for mi, role in enumerate(shape.modules):
        for ki in range(len(ks)):
            extra = statistics.median(times[(role, ki)]) - uncollapsed
            ms[mi, ki] = max(0.0, 1e3 * extra / shape.num_layers)
    return {"module_flops": flops.float(), "module_ms": ms.float(), "step_flops": float(step_flops),
            "step_ms": 1e3 * statistics.median(full_times), "reuse_ms": 1e3 * reuse,
            "forecast_ms": 1e3 * statistics.median(times[("forecast", None)]),
            "decollapse_ms": max(0.0, 1e3 * (uncollapsed - reuse)), "reuse_flops": float(reuse_flops),
            "timing_rows": rows}


def _flop_key(per_module: dict, fqn: str, root: str) -> str:
    """FlopCounterMode names modules by their path from the root module's class name."""
    for key in (f"{root}.{fqn}", fqn):
        if key in per_module:
            return key
    return f"{root}.{fqn}"


# ------------------------------------------------------------------------------------------------
# The profiler


def default_intervals(num_steps: int) -> tuple[int, ...]:
    """The cache ages :func:`profile` measures when none are given: 1..5 up to 125 steps, then
    1..steps//25 (DDPM-250: 1..10).  The longest profiled age bounds the planner's longest gap
    between full steps, hence the fastest plan it can make: at 250 steps, ages up to 5 capped SODA
    near 2.7x measured (a step that reuses everything still costs a fifth of a full one)."""
    return tuple(range(1, max(len(DEFAULT_INTERVALS), num_steps // 25) + 1))


def ages_suffix(num_steps: int) -> str:
    """``-ageN`` where the default cache ages for ``num_steps`` end at N > 5, else empty: names of
    cached profiles and plans made on them tell them apart from those of 1..5 (older versions)."""
    ages = default_intervals(num_steps)
    return f"-age{ages[-1]}" if ages != DEFAULT_INTERVALS else ""


def sensitivity_steps(num_steps: int, count: int) -> list[int]:
    """The steps :func:`measure_sensitivity` measures: ``count`` spread evenly over 1..T-1, and the
    last three (where the images' sensitivity changes fastest); none for ``count`` 0."""
    if count <= 0 or num_steps < 2:
        return []
    even = torch.linspace(1, num_steps - 1, min(count, num_steps - 1)).round().long().tolist()
    return sorted(set(even) | {t for t in range(num_steps - 3, num_steps) if t >= 1})


SENSITIVITY_HOOK = "ditaccel.sensitivity"


def _with_tensor(output, tensor: torch.Tensor):
    """A transformer output of ``output``'s form (tuple, tensor or a diffusers output class)
    carrying ``tensor`` as its sample."""
    if isinstance(output, tuple):
        return (tensor, *output[1:])
    if torch.is_tensor(output):
        return tensor
    return type(output)(**{**output, "sample": tensor})


class _SwapHook(ModelHook):
    """Beneath the runtime's step hook on the transformer: on the reference run (``target`` -1),
    records every call's output per (step, branch); on a run with ``target`` t, returns the
    recorded output for each call before step t and, at step t, the recorded output of step
    t - 1 (without calling the model: up to step t the run is the reference's, the same samples
    and seeds), and computes every later call."""

    def __init__(self, state):
        super().__init__()
        self.state, self.target = state, -1
        self.outputs: dict[tuple[int, int], Any] = {}

    def new_forward(self, module, *args, **kwargs):
        step, branch = self.state.step, self.state.branch
        if self.target < 0:
            out = self.fn_ref.original_forward(*args, **kwargs)
            self.outputs[(step, branch)] = _with_tensor(out, _output_tensor(out).detach().clone())
            return out
        held = self.outputs.get((step if step < self.target else self.target - 1, branch))
        if step > self.target or held is None:
            return self.fn_ref.original_forward(*args, **kwargs)
        return _with_tensor(held, _output_tensor(held).clone())  # (the pipeline may change it in place)


@torch.no_grad()
def measure_sensitivity(pipe, run_images: Callable[[], torch.Tensor], num_steps: int, steps: list[int],
                        progress: bool = True, num_tokens: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mse, structure)``, each (T,) float64: for each step ``t`` of ``steps``, how far
    ``run_images()`` (the same samples and seeds every call; images in [0, 1]) from the full model
    move when the model's output at step ``t`` is replaced by its output at step ``t - 1`` (per
    guidance branch), every other call computed: the mean squared difference per pixel, and the
    mean structural dissimilarity ``1 - SSIM`` (:func:`~ditaccel.metrics.ssim_per_image`); NaN at
    the other steps.  What SODA's planner weights a step's module errors by
    (:func:`~ditaccel.methods.soda.planner.step_weights`): the cache errors of two steps can be
    alike while the images depend on one far more.  The calls before step ``t`` are the reference
    run's, so they are replayed from it, not computed again: a run for step ``t`` calls the model
    ``T - 1 - t`` times per branch.

    Example::

        mse, structure = measure_sensitivity(pipe, lambda: sample(pipe, [0, 1], steps=50)[0], 50, [1, 25, 49])
    """
    from .methods import model_shape
    from .metrics import ssim_per_image
    from .runtime import apply, remove, state_of

    out = torch.full((num_steps,), math.nan, dtype=torch.float64)
    structure = out.clone()
    if not steps:
        return out, structure
    transformer = pipe.transformer
    shape = model_shape(transformer, num_steps, num_tokens)
    plan = full_plan(num_steps, shape.num_layers, shape.num_tokens, shape.modules)
    # the swap beneath the runtime's step hook (registered first), which tells it the step and branch
    registry = HookRegistry.check_if_exists_or_initialize(transformer)
    swap = _SwapHook(None)
    registry.register_hook(swap, SENSITIVITY_HOOK)
    try:
        apply(pipe, plan)
        swap.state = state_of(pipe)
        reference = run_images().double()
        for t in tqdm(steps, desc="step sensitivity", disable=not progress):
            swap.target = t
            images = run_images().double()
            out[t] = float((images - reference).pow(2).mean())
            structure[t] = float((1 - ssim_per_image(reference, images)).mean())
    finally:
        remove(pipe)
        registry.remove_hook(SENSITIVITY_HOOK)
    return out, structure


@dataclass
class ProfileConfig:
    """What :func:`profile` measures.  Class-conditional pipelines (the bundled ones,
    ``DiTPipeline``): ``class_labels`` (one sample each, seeds ``seed + i``), ``sampler``, ``steps``
    and ``guidance_scale``; any other pipeline: ``num_steps`` (its step count) beside the run
    function, and ``description`` for the profile's metadata.  ``intervals``: the cache ages to
    measure (default :func:`default_intervals` of the step count); ``ratios`` and ``token_scores``:
    the partial-recompute grid; ``timing_repeats`` and ``timing_rows``: how often and at how many
    batch rows the module costs are timed (``None``: the profile's own batch; time at the rows you
    will sample, guidance doubling them); ``checkpoint``: an artifact stem the error sums are saved to after
    every batch of ``batch_size`` samples (class-conditional or prompted profiling), resumed from;
    ``error``: the tables' error measure, ``"cosine"`` (``1 - cos``) or ``"relative"`` (squared
    distance relative to the fresh output); ``sensitivity_steps`` and ``sensitivity_samples``: at
    how many steps (:func:`sensitivity_steps`; 0: none) and on how many samples (the first class
    labels; a run function's samples) the images' sensitivity to each step is measured
    (:func:`measure_sensitivity`), one sampling run per step, computed from that step on.

    Example::

        ProfileConfig(class_labels=list(range(10)) * 3, sampler="ddim", steps=50, guidance_scale=3.0)
    """
    class_labels: list[int] | None = None
    sampler: str | None = None
    steps: int | None = None
    guidance_scale: float = 3.0
    seed: int = 0
    batch_size: int = 32
    num_steps: int | None = None
    intervals: tuple[int, ...] | None = None
    ratios: tuple[float, ...] = DEFAULT_RATIOS
    token_scores: tuple[str, ...] = TOKEN_SCORES
    num_tokens: int | None = None
    timing_repeats: int = 5
    timing_rows: int | None = 16
    progress: bool = True
    description: dict | None = None
    checkpoint: str | Path | None = None
    error: str = "cosine"
    sensitivity_steps: int = 12
    sensitivity_samples: int = 4


def profile(pipe, run: Callable[[Any], Any] | None = None, config: ProfileConfig | None = None,
            **options) -> Profile:
    """Profile ``pipe`` along full-model trajectories, as ``config`` (a :class:`ProfileConfig`)
    says: class-conditional pipelines sample its ``class_labels``; any other pipeline gives
    ``run(pipe)``, which calls the pipeline on the samples to profile.  The keyword form
    (``profile(pipe, class_labels=..., steps=...)``) still works, with a DeprecationWarning.

    With ``config.checkpoint`` the samples run in the same batches with the same seeds whether or
    not the run was interrupted, so a resumed profile has exactly the error tables of an
    uninterrupted one (the timings are measured again).  Remove the checkpoint once the profile is
    saved.

    Example::

        prof = ditaccel.profile(pipe, config=ProfileConfig(class_labels=list(range(32)), sampler="ddim", steps=50))
    """
    from .options import resolve

    cfg = resolve(ProfileConfig, config, options, "profile")
    (num_steps, class_labels, sampler, steps, guidance_scale, seed, batch_size, intervals, ratios, token_scores,
     num_tokens, timing_repeats, progress, description, checkpoint) = (
        cfg.num_steps, cfg.class_labels, cfg.sampler, cfg.steps, cfg.guidance_scale, cfg.seed, cfg.batch_size,
        cfg.intervals, cfg.ratios, cfg.token_scores, cfg.num_tokens, cfg.timing_repeats, cfg.progress,
        cfg.description, cfg.checkpoint)
    from .io import model_fingerprint
    from .methods import model_shape
    from .pipeline import SAMPLERS, default_sampler
    from .runtime import apply, remove, state_of
    from .runtime.adapters import block_modules, find_blocks

    from .runtime.adapters import transformer_of

    transformer_of(pipe, "profiling")  # a pipeline without a transformer is refused in one line
    bad = [s for s in token_scores if s not in TOKEN_SCORES]
    if bad or not token_scores:
        raise ProfileError(f"token scores must be among {TOKEN_SCORES}, got {token_scores}")
    if cfg.error not in ERRORS:
        raise ProfileError(f"unknown error measure {cfg.error!r}; choose one of {ERRORS}")
    if not ratios or not all(0 < r < 1 for r in ratios) or list(ratios) != sorted(set(ratios)):
        raise ProfileError(f"ratios must be increasing fractions in (0, 1), got {ratios}")
    if run is None:
        if not class_labels:
            raise ProfileError("give class_labels to profile (or a run function for other pipelines)")
        sampler = sampler or default_sampler(pipe.scheduler)
        if sampler not in SAMPLERS:
            raise ProfileError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
        num_steps = SAMPLERS[sampler][2] if steps is None else steps
        from .sampling import check_steps

        try:
            check_steps(pipe.scheduler, num_steps)
        except ValueError as e:
            raise ProfileError(str(e)) from None
    elif num_steps is None:
        raise ProfileError("with a run function, give num_steps (the pipeline's step count)")
    if checkpoint is not None and run is not None:
        raise ProfileError("checkpoint= needs class_labels: a run function cannot be resumed part way")
    if batch_size < 1:
        raise ProfileError(f"batch size must be >= 1, got {batch_size}")
    if cfg.sensitivity_steps < 0 or cfg.sensitivity_samples < 1:
        raise ProfileError(f"sensitivity_steps must be >= 0 and sensitivity_samples >= 1, got "
                           f"{cfg.sensitivity_steps} and {cfg.sensitivity_samples}")
    if cfg.timing_rows is not None and cfg.timing_rows < 1:
        raise ProfileError(f"timing_rows must be >= 1 (or None: the profile's own batch), got {cfg.timing_rows}")
    if intervals is None:
        intervals = default_intervals(num_steps)
    if not intervals or min(intervals) < 1 or list(intervals) != sorted(set(intervals)):
        raise ProfileError(f"intervals must be increasing integers >= 1, got {intervals}")
    transformer = pipe.transformer
    shape = model_shape(transformer, num_steps, num_tokens)
    t0 = time.perf_counter()

    # the all-anchor plan executes exactly like no plan; its state tells the step and branch
    apply(pipe, full_plan(num_steps, shape.num_layers, shape.num_tokens, shape.modules))
    state = state_of(pipe)
    mods = []
    for layer, (_, block, spec) in enumerate(find_blocks(transformer)):
        for role, module in block_modules(block, spec).items():
            if role in shape.modules:
                mods.append((layer, shape.modules.index(role), module, spec.module_tokens == "text_prefix"))
    rec = _Recorder(state, shape, tuple(intervals), tuple(ratios), tuple(token_scores),
                    keep_inputs=True, error=cfg.error)
    captured: dict[str, Any] = {}

    def capture(module, args, kwargs):
        if "inputs" not in captured and state.step == num_steps // 2:
            captured["inputs"] = (tuple(a.clone() if torch.is_tensor(a) else a for a in args),
                                  {k: (v.clone() if torch.is_tensor(v) else v) for k, v in kwargs.items()})

    from . import distributed as dist

    nproc, me = dist.size(), dist.rank()
    if run is not None and nproc > 1:
        raise ProfileError("a run function profiles in one process; give class_labels to shard "
                           "the samples across processes")
    settings = None
    done = 0
    if checkpoint is not None:
        settings = {"fingerprint": model_fingerprint(transformer), "sampler": sampler, "num_steps": num_steps,
                    "guidance_scale": guidance_scale, "seed": seed, "batch_size": batch_size,
                    "class_labels": [c if isinstance(c, str) else int(c) for c in class_labels],
                    "intervals": list(intervals), "ratios": list(ratios), "token_scores": list(token_scores),
                    "num_tokens": shape.num_tokens, "error": cfg.error}
        resumed: tuple[int, str | None] = (0, None)
        if me == 0 and io.artifact_exists(checkpoint):  # the main process holds the summed tables
            try:
                resumed = (_resume(checkpoint, settings, rec, captured), None)
            except (ProfileError, io.ArtifactError) as e:
                resumed = (0, str(e))
        done, error = dist.broadcast(resumed)
        if error:
            raise ProfileError(error)
    handle = transformer.register_forward_pre_hook(capture, with_kwargs=True)
    rec.attach(mods)
    try:
        with torch.no_grad():
            if run is None:
                from .sampling import sample

                # batches of batch_size samples with seeds seed + start, however many processes run
                # them and wherever a run resumes: the tables are the same sums
                starts = list(range(done, len(class_labels), batch_size))
                rounds = math.ceil(len(starts) / nproc)
                for r in tqdm(range(rounds), desc="profile", unit="batch" if nproc == 1 else "round",
                              disable=not progress or rounds < 2 or me != 0):
                    if r * nproc + me < len(starts):
                        start = starts[r * nproc + me]
                        sample(pipe, class_labels[start:start + batch_size], sampler=sampler, steps=num_steps,
                               guidance_scale=guidance_scale, seed=seed + start, batch_size=batch_size,
                               progress=False, count_flops=False)
                    if checkpoint is not None:
                        sums = {k: dist.all_sum(v) for k, v in rec.sums().items()}
                        if me == 0:
                            nxt = (r + 1) * nproc
                            _save_partial(checkpoint, settings, sums, captured,
                                          starts[nxt] if nxt < len(starts) else len(class_labels))
            else:
                run(pipe)
    finally:
        handle.remove()
        rec.detach()
        remove(pipe)
    if nproc > 1:
        rec.load_sums({k: dist.all_sum(v) for k, v in rec.sums().items()})
    e_c, e_c_std, e_p, e_f = rec.tables()
    profile_s = time.perf_counter() - t0
    costs = None
    if me == 0:  # timed on one process; the others get its numbers
        costs = measure_costs(transformer, shape, ratios, captured["inputs"], repeats=timing_repeats,
                              progress=progress, timing_rows=cfg.timing_rows)
    costs = dist.broadcast(costs)
    sensitivity = structure = sensitivity_s = None
    if me == 0 and cfg.sensitivity_steps:
        t1 = time.perf_counter()
        if run is None:
            from .sampling import sample

            few = class_labels[:cfg.sensitivity_samples]
            run_images = lambda: sample(pipe, few, sampler=sampler, steps=num_steps,  # noqa: E731
                                        guidance_scale=guidance_scale, seed=seed, batch_size=len(few),
                                        progress=False, count_flops=False)[0]
        else:
            from .sampling import as_images

            run_images = lambda: as_images(run(pipe))  # noqa: E731
        sensitivity, structure = measure_sensitivity(pipe, run_images, num_steps,
                                          sensitivity_steps(num_steps, cfg.sensitivity_steps), progress,
                                          shape.num_tokens)
        sensitivity_s = time.perf_counter() - t1
    sensitivity, structure, sensitivity_s = dist.broadcast((sensitivity, structure, sensitivity_s))
    import diffusers

    meta = {"modules": list(shape.modules), "intervals": list(intervals), "ratios": list(ratios),
            "token_scores": list(token_scores), "num_tokens": shape.num_tokens, "error": cfg.error,
            "num_steps": num_steps, "num_layers": shape.num_layers,
            "fingerprint": model_fingerprint(transformer), "model": type(transformer).__name__,
            # the precision it was profiled (and timed) in: what a calibration loads the model in
            "dtype": next((k for k, v in DTYPES.items() if v == transformer.dtype), str(transformer.dtype)),
            "sampler": sampler if run is None else (description or {}).get("sampler"),
            "guidance_scale": guidance_scale if run is None else (description or {}).get("guidance_scale"),
            "samples": len(class_labels) if run is None else (description or {}).get("samples"),
            "class_labels": list(map(int, class_labels)) if run is None else None, "seed": seed,
            "description": description or {}, "timing_rows": costs.pop("timing_rows"),
            "sensitivity_s": sensitivity_s,
            "sensitivity_samples": min(cfg.sensitivity_samples, len(class_labels))
            if sensitivity is not None and run is None else None,
            "profile_s": profile_s, "processes": nproc,
            "cost_s": time.perf_counter() - t0 - profile_s - (sensitivity_s or 0.0),
            "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                         "python": platform.python_version()}}
    return Profile(e_cache=e_c, e_cache_std=e_c_std, e_prune=e_p, e_forecast=e_f, meta=meta,
                   step_sensitivity=sensitivity, step_structure=structure, **costs)
