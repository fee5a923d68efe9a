"""SODA: the profile's error tables, the DP schedule, the pruning rule, budgets, refusals."""

import dataclasses
import itertools
import json
import math

import pytest
import torch

from ditaccel.methods import soda
from ditaccel.plan import FULL, REUSE, Plan
from ditaccel.profiling import ERRORS, Profile, ProfileConfig, ProfileError, _Recorder, default_intervals, profile
from ditaccel.runtime import RUNTIME_REVISION, apply, remove, state_of
from ditaccel.sampling import sample
from tests.conftest import timed_like_flops

STEPS = 8


# -- the DP ---------------------------------------------------------------------------------------

def _brute_force(cost, k):
    t_steps, max_len = cost.shape[0], cost.shape[1] - 1
    best = (math.inf, None)
    for rest in itertools.combinations(range(1, t_steps), k - 1):
        anchors = (0, *rest)
        bounds = [*anchors, t_steps]
        lens = [b - a for a, b in zip(bounds, bounds[1:])]
        if max(lens) > max_len:
            continue
        total = sum(float(cost[a, n]) for a, n in zip(anchors, lens))
        best = min(best, (total, anchors), key=lambda x: x[0])
    return best


@pytest.mark.parametrize("seed", range(6))
def test_dp_schedule_matches_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    t_steps, ages = 9, 3
    e_cache = torch.rand(t_steps, 2, 2, ages, generator=g) * torch.linspace(2, 0.1, t_steps)[:, None, None, None]
    e_cache[0] = float("nan")  # nothing cached before step 0
    cost = soda.segment_costs(e_cache, ages + 1)[0][..., 0]  # reuse only: no gap dimension
    for k in range(3, 7):
        anchors, value = soda.dp_schedule(cost, k)
        expected, best = _brute_force(cost, k)
        assert anchors.sum() == k and anchors[0]
        assert value == pytest.approx(expected)
        got = tuple(torch.nonzero(anchors).flatten().tolist())
        assert sum(float(cost[a, n]) for a, n in zip(got, [b - a for a, b in zip(got, [*got[1:], t_steps])])) \
            == pytest.approx(expected)
    with pytest.raises(ValueError, match="cannot cover"):
        soda.dp_schedule(cost, 2)  # segments of at most 4 steps cannot cover 9 with 2 anchors


def _brute_force_gaps(cost, k):
    """Least sum of cost[a, n, g] over schedules with k anchors (g: the previous segment's length)."""
    t_steps, max_len, n_g = cost.shape[0], cost.shape[1] - 1, cost.shape[2]
    best = math.inf
    for rest in itertools.combinations(range(1, t_steps), k - 1):
        bounds = [0, *rest, t_steps]
        lens = [b - a for a, b in zip(bounds, bounds[1:])]
        if max(lens) > max_len:
            continue
        gaps = [0] + [min(n, n_g - 1) for n in lens[:-1]]
        best = min(best, sum(float(cost[a, n, g]) for a, n, g in zip(bounds, lens, gaps)))
    return best


@pytest.mark.parametrize("seed", range(4))
def test_dp_with_the_previous_gap_matches_brute_force(seed):
    """The forecast's cost depends on the previous segment's length: the DP over (step, gap) finds
    the least total for every anchor count from one table, and its segments say which gap each had."""
    g = torch.Generator().manual_seed(seed)
    t_steps, max_len = 9, 3
    cost = torch.rand(t_steps, max_len + 1, max_len + 1, generator=g).double()
    table = soda.planner.Schedules(cost)
    for k in range(3, 8):
        anchors, value, segments = table.anchors(k)
        assert anchors.sum() == k and anchors[0]
        assert value == pytest.approx(_brute_force_gaps(cost, k))
        assert value == pytest.approx(sum(float(cost[a, n, gap]) for a, n, gap in segments))
        assert segments == soda.planner.segments_of(anchors)


def _forecast_profile(prof, better: tuple[int, int]):
    """``prof`` with forecast errors: one (layer, module) forecasts 10x better than it reuses,
    the others 10x worse."""

    e_c = prof.e_cache
    e_f = (e_c[..., None] * 10).expand(*e_c.shape, max(prof.intervals) + 1).clone()
    e_f[:, better[0], better[1]] = e_c[:, better[0], better[1], :, None] / 10
    return dataclasses.replace(prof, e_forecast=e_f)


def test_the_filler_is_chosen_per_segment_and_module(tiny_profile, tmp_path):
    from ditaccel.plan import Plan

    _, prof = tiny_profile
    fprof = _forecast_profile(prof, (1, 0))
    auto = soda.plan(soda.Config(anchors=3, prune=False), fprof)
    reuse = soda.plan(soda.Config(anchors=3, prune=False, forecast=0), fprof)
    forecast = soda.plan(soda.Config(anchors=3, prune=False, forecast=1), fprof)
    assert reuse.fill is None and reuse.forecast == 0 and forecast.fill is None and forecast.forecast == 1
    assert auto.fill is not None and auto.forecast == 1
    # the chosen module forecasts on every step with two anchors behind it, no other does
    gaps = soda.planner.gaps_of(auto.anchors)
    filled = (~auto.anchors) & (gaps > 0)
    assert filled.any()
    assert (auto.fill[filled, 1, 0] == 1).all() and (auto.fill[~filled] == 0).all()
    assert int(auto.fill.sum()) == int(filled.sum())
    # the DP's optimum under the per-module choice is no worse than either filler alone
    errors = {n: p.meta["predicted"]["error"] for n, p in (("auto", auto), ("reuse", reuse), ("forecast", forecast))}
    assert errors["auto"] <= min(errors["reuse"], errors["forecast"]) + 1e-12, errors
    assert errors["auto"] < errors["reuse"]
    # the fill travels with the plan
    auto.save(tmp_path / "p.json")
    assert Plan.load(tmp_path / "p.json") == auto
    # a profile without forecast errors (made before they were profiled) plans reuse

    plain = soda.plan(soda.Config(anchors=3, prune=False), dataclasses.replace(prof, e_forecast=None))
    assert plain.fill is None and plain.forecast == 0


def test_segment_cost_sums_cache_error_by_age():
    e = torch.zeros(4, 1, 1, 2)
    e[1, 0, 0, 0], e[2, 0, 0, 1], e[2, 0, 0, 0] = 1.0, 10.0, 100.0
    cost = soda.segment_costs(e, 3)[0][..., 0]
    assert cost[0, 1] == 0 and cost[0, 2] == 1.0 and cost[0, 3] == 11.0  # steps 1 (age 1), 2 (age 2)
    assert cost[1, 2] == 100.0  # step 2 at age 1
    assert math.isinf(cost[3, 2])  # runs past the last step


# -- the recorder's cosine algebra ------------------------------------------------------------------

def _feed(rec, t, out, inp, ring):
    """What the recorder's hook does with module ``(0, 0)``'s output at step ``t``."""
    ring[t] = rec._measure(t, 0, 0, out, inp, ring)


def _direct(fresh, approx, error):
    """The error measure computed from the two outputs themselves, averaged over samples."""
    f, a = fresh.flatten(1).double(), approx.flatten(1).double()
    if error == "cosine":
        return float((1 - torch.nn.functional.cosine_similarity(f, a, dim=1)).mean())
    return float(((f - a).pow(2).sum(1) / f.pow(2).sum(1)).mean())


@pytest.mark.parametrize("error", ERRORS)
def test_forecast_error_matches_the_forecast_computed_directly(error):
    """E_f(t, n, g) from kept dot products equals the error measure (1 - cos or the relative
    squared distance) between out_t and y_a + n/g (y_a - y_b) with a = t - n, b = a - g, for every
    age and gap the ring holds; unmeasurable entries stay NaN."""
    class S:
        step, branch = 0, 0

    class Shape:
        num_steps, num_layers, modules, num_tokens = 5, 1, ("mlp",), 6

    rec = _Recorder(S, Shape, (1, 2), (0.5,), ("feature_mean",), keep_inputs=False, error=error)
    assert rec.gaps == (1, 2, 3)
    g = torch.Generator().manual_seed(3)
    drift = torch.randn(3, 6, 4, generator=g)
    ys = [torch.randn(3, 6, 4, generator=g) * 0.005 + drift * (1 + 0.3 * t) + 0.02 * t ** 2 for t in range(5)]
    ring = {}
    for t, y in enumerate(ys):
        _feed(rec, t, y, None, ring)
    *_, e_f = rec.tables()
    assert e_f.shape == (5, 1, 1, 2, 3)
    for t in range(5):
        for ni, n in enumerate((1, 2)):
            for gi, gap in enumerate((1, 2, 3)):
                a, b = t - n, t - n - gap
                if b < 0:
                    assert torch.isnan(e_f[t, 0, 0, ni, gi])
                    continue
                fc = ys[a] + n / gap * (ys[a] - ys[b])
                want = _direct(ys[t], fc, error)
                assert float(e_f[t, 0, 0, ni, gi]) == pytest.approx(want, rel=1e-4, abs=1e-6), (t, n, gap)
    # a smooth trajectory: the forecast beats reuse at age 1, gap 1
    e_c = rec.tables()[0]
    assert e_f[4, 0, 0, 0, 0] < e_c[4, 0, 0, 0]


@pytest.mark.parametrize("error", ERRORS)
def test_prune_error_of_the_mixed_output_matches_a_direct_computation(error):
    class S:
        step, branch = 0, 0

    class Shape:
        num_steps, num_layers, modules, num_tokens = 3, 1, ("mlp",), 10

    rec = _Recorder(S, Shape, (1,), (0.2, 0.5), ("delta", "feature_mean"), keep_inputs=True, error=error)
    g = torch.Generator().manual_seed(0)
    old_out, old_in = torch.randn(2, 10, 4, generator=g), torch.randn(2, 10, 4, generator=g)
    new_in = old_in.clone()
    new_in[:, [3, 7]] += 5.0  # two tokens' inputs moved a lot
    new_out = old_out + 0.1 * torch.randn(2, 10, 4, generator=g)
    new_out[:, [3, 7]] += 3.0
    ring = {}
    _feed(rec, 0, old_out, old_in, ring)
    _feed(rec, 1, new_out, new_in, ring)
    e_c, _, e_p, _ = rec.tables()
    assert e_c[1, 0, 0, 0] == pytest.approx(_direct(new_out, old_out, error), rel=1e-4, abs=1e-6)
    # delta score, rho 0.2 = 2 tokens: exactly the moved ones -> mix = old with tokens 3, 7 fresh
    mix = old_out.clone()
    mix[:, [3, 7]] = new_out[:, [3, 7]]
    assert e_p[1, 0, 0, 0, 0, 0] == pytest.approx(_direct(new_out, mix, error), rel=1e-4, abs=1e-6)
    assert e_p[1, 0, 0, 0, 0, 0] < e_c[1, 0, 0, 0] / 5
    assert torch.isnan(e_c[0]).all() and torch.isnan(e_p[2]).all()  # no cache / not measured


@pytest.mark.parametrize("error", ERRORS)
def test_prune_and_cache_errors_at_every_age_match_a_direct_computation(error):
    """With several ages held at once (the recorder measures them together), each age's cache
    error and each (ratio, score)'s prune error equal the error of the output they stand for: the
    cached output of that age with the highest-scored tokens recomputed."""
    class S:
        step, branch = 0, 0

    class Shape:
        num_steps, num_layers, modules, num_tokens = 4, 1, ("mlp",), 12

    ratios, scores, ages = (0.25, 0.5), ("delta", "feature_mean"), (1, 2, 3)
    rec = _Recorder(S, Shape, ages, ratios, scores, keep_inputs=True, error=error)
    g = torch.Generator().manual_seed(5)
    ins = [torch.randn(3, 12, 4, generator=g) for _ in range(4)]
    outs = [torch.randn(3, 12, 4, generator=g) for _ in range(4)]
    ring = {}
    for t in range(4):
        _feed(rec, t, outs[t], ins[t], ring)
    e_c, _, e_p, _ = rec.tables()
    t = 3
    for ai, n in enumerate(ages):
        old = outs[t - n]
        assert e_c[t, 0, 0, ai] == pytest.approx(_direct(outs[t], old, error), rel=1e-4, abs=1e-6), n
        for si, score in enumerate(scores):
            x = ins[t] - ins[t - n] if score == "delta" else ins[t] - ins[t].mean(dim=1, keepdim=True)
            order = x.norm(dim=-1).argsort(dim=1, descending=True)
            for ri, ratio in enumerate(ratios):
                k = round(ratio * 12)
                mix = old.clone()
                for b in range(3):
                    mix[b, order[b, :k]] = outs[t][b, order[b, :k]]
                want = _direct(outs[t], mix, error)
                assert e_p[t, 0, 0, ai, ri, si] == pytest.approx(want, rel=1e-4, abs=1e-6), (n, score, ratio)
    assert torch.isnan(e_c[2, 0, 0, 2]), "age 3 has no output at step 2"


@pytest.mark.parametrize("error", ERRORS)
def test_an_unchanged_output_records_zero_error_not_a_rounding_negative(error):
    """fp32 rounding of 1 - cosine once left -3e-9 in a real profile, which then refused to load."""
    class S:
        step, branch = 0, 0

    class Shape:
        num_steps, num_layers, modules, num_tokens = 2, 1, ("mlp",), 196

    for seed in (1, 7):  # seeds whose cumulative sums round above the total without the clamp
        rec = _Recorder(S, Shape, (1,), (0.1, 0.25, 0.5, 0.75), ("delta", "feature_mean"), keep_inputs=True,
                        error=error)
        g = torch.Generator().manual_seed(seed)
        out = torch.randn(8, 196, 64, generator=g) * torch.rand(8, 196, 1, generator=g) * 10
        inp = torch.randn(8, 196, 64, generator=g)
        ring = {}
        _feed(rec, 0, out, inp + 0.1 * torch.randn(8, 196, 64, generator=g), ring)
        _feed(rec, 1, out, inp, ring)
        e_c, _, e_p, _ = rec.tables()
        assert (e_c[1] >= 0).all() and (e_p[1] >= 0).all()
        assert float(e_p[1].max()) < 1e-6


# -- profiling the tiny pipeline ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_profile():
    from tests.conftest import tiny_dit
    from ditaccel.models.reference import NOISE_SCHEDULE
    from ditaccel.pipeline import DiTPixelPipeline
    from diffusers import DDIMScheduler

    pipe = DiTPixelPipeline(transformer=tiny_dit(), scheduler=DDIMScheduler(**NOISE_SCHEDULE))
    pipe.set_progress_bar_config(disable=True)
    prof = profile(pipe, class_labels=[0, 1, 2, 3], sampler="ddim", steps=STEPS, guidance_scale=2.0,
                   intervals=(1, 2, 3), ratios=(0.25, 0.5), timing_repeats=2, progress=False)
    return pipe, prof


def _rows_reversed(x, rows, keep):
    """A wrong cut: the last ``keep`` rows of every batch tensor instead of the first."""
    if torch.is_tensor(x):
        return x[rows - keep:] if x.dim() and x.shape[0] == rows else x
    if isinstance(x, dict):
        return {k: _rows_reversed(v, rows, keep) for k, v in x.items()}
    return type(x)(_rows_reversed(v, rows, keep) for v in x) if isinstance(x, (tuple, list)) else x


def test_module_costs_are_taken_on_the_first_rows_only_where_they_give_the_same_output(tiny_pipe, monkeypatch):
    """The profile times module costs at ``timing_rows`` rows of its captured call; FLOPs per row
    are the whole call's.  A cut that does not reproduce those rows' output falls back to the whole."""
    from ditaccel import profiling
    from ditaccel.methods import model_shape

    tr = tiny_pipe.transformer
    shape = model_shape(tr, STEPS)
    g = torch.Generator().manual_seed(0)
    call = ((), {"hidden_states": torch.randn(8, 1, 8, 8, generator=g), "timestep": torch.arange(8) * 100 + 50,
                 "class_labels": torch.tensor([0, 1, 2, 3, 3, 2, 1, 0])})
    with torch.no_grad():
        whole = profiling.measure_costs(tr, shape, (0.25, 0.5), call, repeats=1, progress=False, timing_rows=None)
        cut = profiling.measure_costs(tr, shape, (0.25, 0.5), call, repeats=1, progress=False, timing_rows=4)
        monkeypatch.setattr(profiling, "_batch_rows", _rows_reversed)
        wrong = profiling.measure_costs(tr, shape, (0.25, 0.5), call, repeats=1, progress=False, timing_rows=4)
    assert whole["timing_rows"] == 8 and cut["timing_rows"] == 4 and wrong["timing_rows"] == 8
    torch.testing.assert_close(cut["module_flops"], whole["module_flops"])
    assert cut["step_flops"] == pytest.approx(whole["step_flops"]) and cut["step_ms"] > 0


def test_profile_tables_have_the_documented_shape(tiny_profile):
    pipe, prof = tiny_profile
    assert prof.meta["dtype"] == "fp32"  # the precision a calibration of it loads the model in
    assert prof.e_cache.shape == (STEPS, 2, 2, 3)
    assert prof.gaps == (1, 2, 3, 4) and prof.e_forecast.shape == (STEPS, 2, 2, 3, 4)
    for i, n in enumerate((1, 2, 3)):  # measured where both outputs exist: t - n - g >= 0
        for j, g in enumerate(prof.gaps):
            assert torch.isnan(prof.e_forecast[:n + g, :, :, i, j]).all()
            assert (prof.e_forecast[n + g:, :, :, i, j] >= 0).all()
    assert prof.e_prune.shape == (STEPS, 2, 2, 3, 2, 2)
    assert prof.module_flops.shape == (2, 2, 3) and prof.module_ms.shape == (2, 3)
    for i, n in enumerate((1, 2, 3)):
        assert torch.isnan(prof.e_cache[:n, :, :, i]).all()
        assert (prof.e_cache[n:, :, :, i] > 0).all()
    # the error of an older cache is larger on average; more recompute repairs more
    assert prof.e_cache[3:, ..., 2].mean() > prof.e_cache[3:, ..., 0].mean()
    assert (prof.e_prune[3:, ..., 1, :] <= prof.e_prune[3:, ..., 0, :] + 1e-6).float().mean() > 0.9
    # partial MLP FLOPs scale with tokens; attention keeps its all-token keys / values
    n = prof.num_tokens
    mlp, attn = prof.module_flops[0, 1].tolist(), prof.module_flops[0, 0].tolist()
    assert mlp[2] > 0 and mlp[0] == pytest.approx(mlp[2] * prof.tokens_for_ratio(0.25) / n, rel=1e-6)
    assert attn[2] * prof.tokens_for_ratio(0.25) / n < attn[0] < attn[2]
    assert prof.step_flops > float(prof.module_flops[..., -1].sum())
    assert set(prof.variation()) == {"cv_median", "cv_p90"}


def test_default_cache_ages_grow_with_the_step_count(tiny_pipe):
    assert default_intervals(6) == default_intervals(50) == default_intervals(125) == (1, 2, 3, 4, 5)
    assert default_intervals(250) == tuple(range(1, 11))
    assert default_intervals(1000) == tuple(range(1, 41))
    prof = profile(tiny_pipe, class_labels=[0], sampler="ddim", steps=4, guidance_scale=2.0,
                   ratios=(0.5,), timing_repeats=1, progress=False)
    assert prof.intervals == default_intervals(4)
    with pytest.raises(ProfileError, match="intervals must be increasing"):
        profile(tiny_pipe, class_labels=[0], sampler="ddim", steps=4, intervals=(2, 1), progress=False)


def test_the_error_measure_is_chosen_and_recorded(tiny_pipe):
    """The same trajectories give other tables under the relative measure, which the profile
    records; an unknown measure is refused before any sampling."""
    opts = dict(class_labels=[0, 1], sampler="ddim", steps=4, guidance_scale=2.0, ratios=(0.5,),
                timing_repeats=1, progress=False)
    cos = profile(tiny_pipe, config=ProfileConfig(**opts))
    rel = profile(tiny_pipe, config=ProfileConfig(**opts, error="relative"))
    assert (cos.meta["error"], rel.meta["error"]) == ("cosine", "relative")
    measured = torch.isfinite(cos.e_cache)
    assert torch.equal(measured, torch.isfinite(rel.e_cache)) and (rel.e_cache[measured] >= 0).all()
    assert not torch.allclose(cos.e_cache[measured], rel.e_cache[measured])
    with pytest.raises(ProfileError, match="unknown error measure 'l1'"):
        profile(tiny_pipe, config=ProfileConfig(**opts, error="l1"))


def test_profile_round_trips_and_refuses_other_settings(tiny_profile, tmp_path):
    pipe, prof = tiny_profile
    prof.save(tmp_path / "p")
    back = Profile.load(tmp_path / "p")
    assert torch.equal(back.e_prune.nan_to_num(-1), prof.e_prune.nan_to_num(-1))
    assert back.meta["fingerprint"] == prof.meta["fingerprint"] and back.step_ms == prof.step_ms
    with pytest.raises(ProfileError, match="another model"):
        back.check_for(fingerprint="0" * 16)
    with pytest.raises(ProfileError, match="ddim sampler, not dpm"):
        back.check_for(sampler="dpm++")
    with pytest.raises(ProfileError, match="for 8 sampling steps, not 50"):
        back.check_for(num_steps=50)
    with pytest.raises(ProfileError, match="no profile at"):
        Profile.load(tmp_path / "missing")
    assert torch.equal(back.step_sensitivity.nan_to_num(-1), prof.step_sensitivity.nan_to_num(-1))
    assert torch.equal(back.step_structure.nan_to_num(-1), prof.step_structure.nan_to_num(-1))
    assert back.decollapse_ms == prof.decollapse_ms >= 0 and back.reuse_ms == prof.reuse_ms
    assert back.forecast_ms == prof.forecast_ms and prof.forecast_ms > 0
    # the tiny DiT's collapsed reusing step computes what its blocks' own forwards would
    rest = prof.step_flops - float(prof.module_flops[..., -1].sum())
    assert back.reuse_flops == prof.reuse_flops == pytest.approx(rest, rel=1e-6)
    assert dataclasses.replace(prof, step_sensitivity=prof.step_sensitivity[1:]).problem() \
        == "its step sensitivity's length differs from its step count"
    assert dataclasses.replace(prof, step_structure=prof.step_structure[1:]).problem() \
        == "its step sensitivity's length differs from its step count"


def test_step_sensitivity_is_how_far_the_images_move_when_one_step_reuses_its_output(tiny_profile):
    """Measured at the documented steps only, and equal to the same swap done by hand: the model's
    output at step t replaced by its output at step t - 1 (one call per step here), in squared
    pixel error and in structural dissimilarity (1 - SSIM)."""
    from ditaccel.metrics import ssim_per_image
    from ditaccel.profiling import sensitivity_steps

    pipe, prof = tiny_profile
    s = prof.step_sensitivity
    assert prof.step_structure.shape == (STEPS,) and math.isnan(prof.step_structure[0])
    steps = sensitivity_steps(STEPS, ProfileConfig.sensitivity_steps)
    assert steps == list(range(1, STEPS)) and sensitivity_steps(50, 4) == [1, 17, 33, 47, 48, 49]
    assert sensitivity_steps(50, 0) == [] and s.shape == (STEPS,) and math.isnan(s[0])
    assert all(float(s[t]) > 0 for t in steps)

    def by_hand(t):
        outs = []

        def hook(module, args, output):
            outs.append(output.sample.clone())
            if len(outs) == t + 1:
                output.sample = outs[t - 1]
            return output

        h = pipe.transformer.register_forward_hook(hook)
        try:
            return sample(pipe, [0, 1, 2, 3], sampler="ddim", steps=STEPS, guidance_scale=2.0, seed=0,
                          batch_size=4, progress=False, count_flops=False)[0].double()
        finally:
            h.remove()

    with torch.no_grad():
        full = sample(pipe, [0, 1, 2, 3], sampler="ddim", steps=STEPS, guidance_scale=2.0, seed=0,
                      batch_size=4, progress=False, count_flops=False)[0].double()
        for t in (1, STEPS - 2):
            got = by_hand(t)
            assert float(s[t]) == pytest.approx(float((got - full).pow(2).mean()), rel=1e-6)
            assert float(prof.step_structure[t]) == pytest.approx(float((1 - ssim_per_image(full, got)).mean()),
                                                                  rel=1e-6)
            assert float(prof.step_structure[t]) > 0


def test_step_sensitivity_replays_the_steps_before_the_swap_instead_of_computing_them(tiny_profile):
    """A run for step t calls the model only after step t (once per step here: guidance is one
    batched call); the reference run calls it at every step.  The calls before t are the
    reference's, so the result is the profile's, measured with every call computed."""
    from ditaccel.profiling import measure_sensitivity

    pipe, prof = tiny_profile
    calls = []
    h = pipe.transformer.transformer_blocks[0].register_forward_hook(lambda *a: calls.append(1))

    def run():
        return sample(pipe, [0, 1, 2, 3], sampler="ddim", steps=STEPS, guidance_scale=2.0, seed=0,
                      batch_size=4, progress=False, count_flops=False)[0]

    try:
        mse, structure = measure_sensitivity(pipe, run, STEPS, [1, 5, STEPS - 1], progress=False)
    finally:
        h.remove()
    assert len(calls) == STEPS + (STEPS - 2) + (STEPS - 6) + 0
    for t in (1, 5, STEPS - 1):
        assert float(mse[t]) == pytest.approx(float(prof.step_sensitivity[t]), rel=1e-6)
        assert float(structure[t]) == pytest.approx(float(prof.step_structure[t]), rel=1e-6)
    assert math.isnan(mse[2]) and not pipe.transformer._diffusers_hook.hooks


def test_weighted_segment_costs_add_a_segments_steps_coherently():
    e = torch.zeros(4, 1, 2, 2)
    e[1, 0, :, 0] = torch.tensor([1.0, 3.0])   # step 1 at age 1: 4 in all
    e[2, 0, :, 1] = torch.tensor([2.0, 7.0])   # step 2 at age 2: 9
    e[2, 0, :, 0] = 5.0
    w = torch.tensor([0.0, 1.0, 4.0, 1.0], dtype=torch.float64)
    cost = soda.segment_costs(e, 3, weights=w)[0][..., 0]
    assert cost[0, 2] == pytest.approx(4.0) and cost[0, 3] == pytest.approx((2 + 6) ** 2)  # sqrt(1*4) + sqrt(4*9)
    assert cost[1, 2] == pytest.approx(4 * 10) and soda.segment_costs(e, 3)[0][0, 3, 0] == 13
    # forecasts: the per-module choice made on the segment's sums, then weighted step by step
    f = torch.zeros(4, 1, 2, 2, 1)
    f[1, 0, :, 0, 0] = torch.tensor([0.5, 4.0])
    f[2, 0, :, 1, 0] = torch.tensor([1.0, 9.0])
    cost, use = soda.segment_costs(e, 3, f, None, weights=w)
    assert use[0, 3, 1].tolist() == [[True, False]]  # module 0: 1.5 < 3; module 1: 13 > 10
    assert cost[0, 3, 1] == pytest.approx((math.sqrt(0.5 + 3.0) + math.sqrt(4 * (1.0 + 7.0))) ** 2)


def test_step_weights_interpolate_the_measured_sensitivity_over_the_steps_filler_error(tiny_profile):
    """The weight is the sensitivity over the age-1 error of the filler the plans run: the
    forecast's, averaged over the gaps measured at that step; plain reuse's where no gap is."""
    _, prof = tiny_profile
    sens = torch.full((STEPS,), math.nan, dtype=torch.float64)
    sens[2], sens[6] = 1e-4, 1e-2
    expected = [1e-4, 1e-4, 1e-4, 10 ** -3.5, 1e-3, 10 ** -2.5, 1e-2, 1e-2]
    w = soda.step_weights(dataclasses.replace(prof, step_sensitivity=sens))
    reuse = [float(prof.e_cache[t, :, :, 0].double().sum()) for t in range(STEPS)]
    filler = []
    for t in range(STEPS):
        per_gap = [prof.e_forecast[t, :, :, 0, g].double() for g in range(len(prof.gaps))]
        per_gap = [e for e in per_gap if bool(torch.isfinite(e).all())]
        filler.append(float(sum(per_gap).sum()) / len(per_gap) if per_gap else reuse[t])
    assert any(f != r for f, r in zip(filler, reuse)) and any(f == r for f, r in zip(filler[1:], reuse[1:]))
    assert [float(w[t]) * filler[t] for t in range(1, STEPS)] == pytest.approx(expected[1:], rel=1e-9)
    w_reuse = soda.step_weights(dataclasses.replace(prof, step_sensitivity=sens, e_forecast=None))
    assert [float(w_reuse[t]) * reuse[t] for t in range(1, STEPS)] == pytest.approx(expected[1:], rel=1e-9)
    with pytest.raises(ValueError, match="no step sensitivity"):
        soda.step_weights(dataclasses.replace(prof, step_sensitivity=None))


def test_the_weighted_dp_minimises_the_images_predicted_error(tiny_profile):
    """With weighting, the anchors are the schedule of least predicted image error (brute force
    over every schedule), the plan says that error, and calibration offers it after the unweighted
    DPs."""
    _, prof = tiny_profile
    k = 4
    p = soda.plan(soda.Config(anchors=k, prune=False, forecast=1, weighting="sensitivity"), prof)
    assert p.meta["config"]["weighting"] == "sensitivity"
    assert soda.Config(anchors=k, weighting="sensitivity").tag() == "soda-w-a4"
    best = math.inf
    for rest in itertools.combinations(range(1, STEPS), k - 1):
        anchors = torch.zeros(STEPS, dtype=torch.bool)
        anchors[[0, *rest]] = True
        if int(soda.ages_of(anchors).max()) > max(prof.intervals):
            continue
        q = dataclasses.replace(p, anchors=anchors, tokens=torch.where(
            anchors[:, None, None], torch.full_like(p.tokens, FULL), torch.full_like(p.tokens, REUSE)))
        best = min(best, soda.predict(q, prof)["image_error"])
    assert p.meta["predicted"]["image_error"] == pytest.approx(best, rel=1e-9)
    plans = soda.schedules(soda.Config(speedup=2.0), prof)
    weighted = soda.plan(soda.Config(speedup=2.0, prune=False, forecast=1, weighting="sensitivity"), prof)
    same = [i for i, q in enumerate(plans) if torch.equal(q.anchors, weighted.anchors) and q.fill is None
            and q.forecast == 1]
    plain_dps = [q for q in plans if q.meta["config"]["schedule"] == "dp" and q.meta["config"]["weighting"] == "none"]
    # right after the unweighted DPs, forecasting everywhere (unless one of them has its anchors:
    # here the DP priced by plain reuse)
    assert same and (same[0] == len(plain_dps) or plans[same[0]].meta["config"]["pricing"] == "reuse")
    assert all(q.meta["config"]["weighting"] != "none" for q in plans[len(plain_dps):]
               if q.meta["config"]["schedule"] == "dp")
    structure = soda.plan(soda.Config(speedup=2.0, prune=False, forecast=1, weighting="structure"), prof)
    # offered too (unless an earlier candidate has its schedule and filler)
    assert any(torch.equal(q.anchors, structure.anchors) and q.fill is None and q.forecast == 1 for q in plans)
    assert soda.Config(anchors=k, weighting="structure").tag() == "soda-ws-a4"
    # the structure weights are the structural sensitivity over the same reuse error
    ratio = soda.step_weights(prof, "structure")[1:] / soda.step_weights(prof)[1:]
    assert ratio.tolist() == pytest.approx((prof.step_structure[1:] / prof.step_sensitivity[1:]).tolist(), rel=1e-9)
    unweighted = soda.schedules(soda.Config(speedup=2.0), dataclasses.replace(prof, step_sensitivity=None,
                                                                               step_structure=None))
    assert all(q.meta["config"]["weighting"] == "none" for q in unweighted)
    with pytest.raises(ValueError, match="no step structure"):
        soda.plan(soda.Config(anchors=k, weighting="structure"), dataclasses.replace(prof, step_structure=None))
    with pytest.raises(ValueError, match="weighting must be one of"):
        soda.Config(speedup=2.0, weighting="sqrt")


def test_calibration_offers_reuse_priced_schedules_run_forecasting(tiny_profile):
    """Each spread's DP schedule priced by plain reuse, run forecasting everywhere, is a candidate
    after the schedules priced by their filler and before the weighted ones; the plan keeps its
    pricing, so the second round plans with it too."""
    _, prof = tiny_profile
    plans = soda.schedules(soda.Config(speedup=2.0), prof)
    priced = [q for q in plans if q.meta["config"]["pricing"] == "reuse"]
    assert priced  # (on the tiny model, at spread 1.5, reuse places the anchors elsewhere)
    for q in priced:
        spread = q.meta["config"]["spread"]
        reuse = soda.plan(soda.Config(speedup=2.0, prune=False, forecast=0, spread=spread), prof)
        fc = soda.plan(soda.Config(speedup=2.0, prune=False, forecast=1, spread=spread), prof)
        assert torch.equal(q.anchors, reuse.anchors) and not torch.equal(q.anchors, fc.anchors)
        assert q.fill is None and q.forecast == 1
        # its predicted error is the forecast's on those anchors, not reuse's
        assert q.meta["predicted"]["error"] != pytest.approx(reuse.meta["predicted"]["error"])
    from ditaccel.methods.soda.planner import preference

    ranks = [preference(q.meta["config"]["schedule"], q.meta["config"]["weighting"], q.meta["config"]["pricing"])
             for q in plans]
    assert ranks == sorted(ranks) and 1 in ranks
    assert soda.Config(speedup=2.0, forecast=1, pricing="reuse", spread=1.5).tag() == "soda-s1.5-rp-f1-x2"
    # the second round's plans: the same pricing, so the caching-only one is the kept schedule
    kept = soda.Config(speedup=2.0, forecast=1, pricing="reuse", spread=priced[0].meta["config"]["spread"])
    assert torch.equal(soda.candidates(kept, prof)[0].anchors, priced[0].anchors)
    # none where nothing forecasts: a reuse-only profile or filler
    assert all(q.meta["config"]["pricing"] == "filler" for q in soda.schedules(
        soda.Config(speedup=2.0), dataclasses.replace(prof, e_forecast=None)))
    assert all(q.meta["config"]["pricing"] == "filler" for q in soda.schedules(soda.Config(speedup=2.0, forecast=0), prof))
    with pytest.raises(ValueError, match="pricing must be one of"):
        soda.Config(speedup=2.0, pricing="flops")


@pytest.mark.parametrize("opts", [{"speedup": 2.0}, {"speedup": 2.0, "prune": False},
                                  {"speedup": 1.6, "schedule": "uniform"}, {"latency_speedup": 1.8},
                                  {"anchors": 3}])
def test_soda_plans_meet_their_budget_and_predict_their_flops(tiny_profile, opts):
    pipe, prof = tiny_profile
    if "latency_speedup" in opts:  # the tiny model's timings are noise: plan with fixed ones

        prof = dataclasses.replace(prof, step_ms=10.0, reuse_ms=2.0, decollapse_ms=0.5, forecast_ms=2.5,
                                   module_ms=torch.tensor([[1.0, 1.5, 2.0], [0.5, 1.0, 2.0]]))
    plan = soda.plan(soda.Config(**opts), prof)
    pred = plan.meta["predicted"]
    if "speedup" in opts:
        assert pred["speedup_flops"] >= opts["speedup"] * (1 - 1e-9)
    if "latency_speedup" in opts:
        assert pred["speedup_latency"] >= opts["latency_speedup"] * (1 - 1e-9)
    if "anchors" in opts:
        assert int(plan.anchors.sum()) == 3
    if opts.get("prune") is False:
        assert set(plan.tokens[~plan.anchors].unique().tolist()) <= {REUSE}
    # the prediction is the runtime's own FLOP count
    apply(pipe, plan)
    _, stats = sample(pipe, [0], steps=STEPS, guidance_scale=2.0, progress=False)
    assert stats.flops / 2 == pytest.approx(pred["flops"], rel=1e-6)  # one image = 2 CFG rows
    remove(pipe)


def test_pruning_only_where_it_beats_reuse(tiny_profile):
    _, prof = tiny_profile
    prof = timed_like_flops(prof)
    plan = soda.plan(soda.Config(speedup=1.5, lam=1.0), prof)
    tok = plan.tokens
    assert (tok[~plan.anchors] > 0).any(), "the rule should recompute somewhere at this budget"
    ages = soda.ages_of(plan.anchors)
    for t, layer, m in torch.nonzero(tok > 0).tolist():
        ri = [prof.tokens_for_ratio(r) for r in prof.ratios].index(int(tok[t, layer, m]))
        j = int(ages[t]) - 1
        assert prof.e_prune[t, layer, m, j, ri, 0] < prof.e_cache[t, layer, m, j]
    more = soda.plan(soda.Config(speedup=1.3, lam=1.0), prof)
    assert more.meta["predicted"]["error"] <= plan.meta["predicted"]["error"]


def test_partial_actions_only_where_they_save_time_and_priced_by_it(tiny_profile):
    _, prof = tiny_profile
    prof = timed_like_flops(prof)
    cfg = soda.Config(speedup=1.5, lam=1.0)
    pruned = soda.plan(cfg, prof)
    assert (pruned.tokens[~pruned.anchors] > 0).any()
    pred = pruned.meta["predicted"]
    assert pred["charged_flops"] == pytest.approx(pred["flops"])  # times follow FLOPs here
    # the smaller ratio takes as long as the full module: only the larger one may be used
    ms = prof.module_ms.clone()
    ms[:, 0] = ms[:, -1]
    slow = dataclasses.replace(prof, module_ms=ms)
    assert soda.partial_pays(slow).tolist() == [[False, True]] * len(prof.modules)
    p = soda.plan(cfg, slow)
    k_small = prof.tokens_for_ratio(prof.ratios[0])
    assert not (p.tokens == k_small).any() and (p.tokens[~p.anchors] > 0).any()
    # charged at the full module's FLOPs, above their own: the FLOP budget is met with room
    pred = p.meta["predicted"]
    assert pred["charged_flops"] >= pred["flops"]
    assert pred["speedup_flops"] >= 1.5 * (1 - 1e-9)
    # no ratio saves time: no partial action at all, the budget spent on anchors
    ms[:, 1] = ms[:, -1] * 1.01
    never = soda.plan(cfg, dataclasses.replace(prof, module_ms=ms))
    assert not (never.tokens[~never.anchors] > 0).any()
    assert never.meta["predicted"]["charged_flops"] == pytest.approx(never.meta["predicted"]["flops"])
    # a reusing step on which any module computes runs block by block: its cost beyond the
    # collapsed step is charged once per such step, to the latency and (at its share of a full
    # step's time) to a FLOP budget, which the plan still meets
    base = soda.predict(pruned, prof)
    apart = dataclasses.replace(prof, decollapse_ms=0.25 * prof.step_ms)
    q = soda.predict(pruned, apart)
    steps = int((pruned.tokens[~pruned.anchors] > 0).flatten(1).any(1).sum())
    assert steps > 0 and q["flops"] == base["flops"]
    assert q["charged_flops"] == pytest.approx(base["charged_flops"] + steps * 0.25 * prof.step_flops)
    assert q["latency_ms"] == pytest.approx(base["latency_ms"] + steps * 0.25 * prof.step_ms)
    honest = soda.plan(cfg, apart).meta["predicted"]
    assert honest["charged_flops"] <= STEPS * prof.step_flops / 1.5 * (1 + 1e-9)


def test_latency_charges_a_forecast_beyond_reuse_on_the_steps_that_forecast(tiny_profile):
    """A forecasting step costs the profile's forecast_ms - reuse_ms more than a reusing one, at
    the share of its modules that forecast, from the second anchor on (before it there is one
    output to read, and the runtime reuses it); FLOPs and the FLOP budget's charge do not see it."""
    _, prof = tiny_profile
    prof = dataclasses.replace(timed_like_flops(prof), forecast_ms=None)
    anchors = torch.tensor([True, False, False, True, False, True, False, False])
    tokens = torch.full((STEPS, prof.num_layers, len(prof.modules)), REUSE)
    tokens[anchors] = FULL
    reuse = soda.predict(Plan(prof.num_tokens, prof.modules, anchors, tokens), prof)
    fill = torch.ones_like(tokens, dtype=torch.int32)
    fill[:, 0, 0] = 0                        # one (layer, module) reuses everywhere
    planned = Plan(prof.num_tokens, prof.modules, anchors, tokens, forecast=1, fill=fill)
    cost = lambda pred: {k: pred[k] for k in ("flops", "charged_flops", "latency_ms")}  # noqa: E731
    assert cost(soda.predict(planned, prof)) == cost(reuse)  # (not measured: priced as reuse)
    timed = dataclasses.replace(prof, forecast_ms=prof.reuse_ms + 2.0)
    got = soda.predict(planned, timed)
    share = 1 - 1 / (prof.num_layers * len(prof.modules))
    assert got["latency_ms"] == pytest.approx(reuse["latency_ms"] + 3 * share * 2.0)  # steps 4, 6, 7
    assert got["flops"] == reuse["flops"] and got["charged_flops"] == reuse["charged_flops"]
    assert cost(soda.predict(Plan(prof.num_tokens, prof.modules, anchors, tokens), timed)) == cost(reuse)


def test_candidates_spend_one_budget_in_different_ways(tiny_profile):
    _, prof = tiny_profile
    prof = timed_like_flops(prof)
    cands = soda.candidates(soda.Config(speedup=1.6, lam=1.0), prof, fewer=2)
    assert cands[0].method == "soda-cache" and len(cands) >= 2
    k_max = int(cands[0].anchors.sum())
    assert all(int(c.anchors.sum()) <= k_max for c in cands)
    for c in cands:
        assert c.meta["predicted"]["speedup_flops"] >= 1.6 * (1 - 1e-9)
    assert any((c.tokens[~c.anchors] > 0).any() for c in cands[1:])
    assert len(soda.candidates(soda.Config(speedup=1.6, prune=False), prof)) == 1
    with pytest.raises(ValueError, match="budget"):
        soda.candidates(soda.Config(anchors=3), prof)


def test_calibrate_keeps_the_plan_closest_to_the_full_model(tiny_profile):
    pipe, prof = tiny_profile

    def run(p):
        return sample(p, [0, 1], steps=STEPS, guidance_scale=2.0, seed=7, progress=False)[0]

    full = run(pipe)
    cands = soda.candidates(soda.Config(speedup=1.6, lam=1.0), prof, fewer=2)
    # an all-anchor plan costs more than the budget but is exact: calibration must pick it
    exact = soda.plan(soda.Config(anchors=STEPS, prune=False), prof)
    best, rows = soda.calibrate(pipe, run, [*cands, exact], progress=False)
    assert len(rows) == len(cands) + 1 and rows[-1]["mse"] == 0 and rows[-1]["psnr"] == math.inf
    assert torch.equal(best.anchors, exact.anchors) and best.meta["calibration"]["chosen"] == len(cands)
    # without it, the measured-best candidate; each row's error is that plan's real error
    best, rows = soda.calibrate(pipe, run, cands, progress=False)
    i = best.meta["calibration"]["chosen"]
    assert rows[i]["score"] == min(r["score"] for r in rows) and best.meta["calibration"]["criterion"] == "mse+ssim"
    apply(pipe, cands[0])
    got = run(pipe)
    remove(pipe)
    assert rows[0]["mse"] == pytest.approx(float((got.double() - full.double()).pow(2).mean()), rel=1e-9)
    per = (got.double() - full.double()).pow(2).flatten(1).mean(1)
    assert rows[0]["mse_samples"] == pytest.approx(per.tolist(), rel=1e-9)
    assert rows[0]["mse_se"] == pytest.approx(float(per.std() / math.sqrt(2)), rel=1e-9)
    # the score: log MSE plus log structural dissimilarity, per sample
    from ditaccel.metrics import ssim_per_image
    ssim_ = ssim_per_image(full, got)
    assert rows[0]["ssim_samples"] == pytest.approx(ssim_.tolist(), rel=1e-9)
    floor = 1e-12  # (identical images)
    assert rows[0]["score_samples"] == pytest.approx(
        (per.clamp_min(floor).log() + (1 - ssim_).clamp_min(floor).log()).tolist(), rel=1e-9)
    # "mse": the mean MSE alone decides
    _, by_mse = soda.calibrate(pipe, run, cands, progress=False, criterion="mse")
    assert by_mse[0]["score_samples"] == pytest.approx(per.tolist(), rel=1e-9)
    assert rows[i]["z_vs_chosen"] == 0 and all(r["z_vs_chosen"] >= 0 for r in rows)
    assert torch.equal(run(pipe), full), "calibration must leave the pipeline unplanned"


def test_calibration_spread_is_paired_over_the_samples():
    from ditaccel.methods.soda.calibration import margin, spread

    rows = [{"mse_samples": [1.0, 2.0, 3.0]}, {"mse_samples": [1.5, 2.0, 4.0]}, {"mse_samples": [2.0, 3.0, 4.0]}]
    spread(rows, 0)
    assert rows[0]["z_vs_chosen"] == 0 and rows[0]["mse_se"] == pytest.approx(1 / math.sqrt(3))
    # differences 0.5, 0, 1: mean 0.5, sd 0.5 -> se 0.5 / sqrt(3)
    assert rows[1]["z_vs_chosen"] == pytest.approx(math.sqrt(3))
    assert rows[2]["z_vs_chosen"] == math.inf  # every sample 1 worse: told apart for sure
    assert margin(rows, 0) == pytest.approx(math.sqrt(3))


def test_calibration_prefers_the_earliest_plan_within_the_noise():
    from ditaccel.methods.soda.calibration import prefer

    def row(samples):
        return {"mse_samples": samples, "mse": sum(samples) / len(samples)}

    far = row([5.0, 5.0, 5.0, 5.0])          # worse on every sample: told apart for sure
    near = row([1.0, 1.2, 0.9, 1.1])         # 0.52 standard errors above the closest
    low = row([0.9, 1.3, 0.8, 1.1])
    assert prefer([far, near, low], 1.0) == 1
    assert prefer([far, near, low], 0.5) == 2
    assert prefer([far, near, low], 0.0) == 2
    assert prefer([low, near], 1.0) == 0     # the closest listed first stays
    assert prefer([row([1.0]), row([0.5])], 1.0) == 1  # one sample: no spread, no preference
    # rows with a calibration score are compared by it, not by their MSE
    assert prefer([{**far, "score_samples": [0.0] * 4}, low], 1.0) == 0


def test_the_calibration_score_counts_a_fraction_off_in_pixels_or_structure_alike():
    from ditaccel.methods.soda.calibration import scores

    mse, dis = torch.tensor([1e-4, 2e-4]), torch.tensor([1e-3, 5e-4])
    s = scores(mse, dis)
    assert s[0] == pytest.approx(s[1])  # twice the MSE, half the dissimilarity
    assert scores(mse * 2, dis)[0] - s[0] == pytest.approx(math.log(2))
    assert scores(mse, dis, "mse").tolist() == pytest.approx(mse.tolist())
    assert torch.isfinite(scores(torch.zeros(1), torch.zeros(1))).all()  # identical images: floored
    with pytest.raises(ValueError, match="criterion must be one of"):
        scores(mse, dis, "lpips")
    with pytest.raises(ValueError, match="criterion must be one of"):
        soda.CalibrationConfig(criterion="psnr")


def test_calibration_prefers_even_schedules_forecasts_and_caching_only(tiny_profile):
    """Candidates are listed most preferred first, and the kept plan is the earliest that the
    samples cannot tell from the closest: with the default ``within`` (1) its MSE lies at most one
    paired standard error above the smallest, and no earlier candidate's does."""
    from ditaccel.methods.soda.calibration import prefer

    pipe, prof = tiny_profile
    scheds = soda.schedules(soda.Config(speedup=1.6), prof)
    dp = [p.meta["config"] for p in scheds if p.meta["config"]["schedule"] == "dp"]
    order = [soda.SPREADS.index(c["spread"]) for c in dp if c["weighting"] == "none" and c["pricing"] == "filler"]
    assert order == sorted(order) and soda.SPREADS[0] == 1.0 and soda.SPREADS[-1] is None
    assert all(p.meta["config"]["schedule"] == "dp" for p in scheds[:len(dp)])  # uniform last
    # the sensitivity-weighted DPs after every unweighted one (a weighted DP's schedule is free:
    # less even than any held to a spread)
    kinds = [c["weighting"] for c in dp]
    assert kinds == sorted(kinds, key=lambda k: k != "none")
    if "structure" in kinds and "sensitivity" in kinds:  # (where their schedules differ from every earlier one's)
        assert kinds.index("sensitivity") < kinds.index("structure")
    weighted = soda.plan(soda.Config(speedup=1.6, prune=False, forecast=1, weighting="sensitivity"), prof)
    assert any(torch.equal(q.anchors, weighted.anchors) and q.fill is None and q.forecast == 1 for q in scheds)
    first = scheds[0]
    assert first.fill is None and first.forecast == 1  # forecast everywhere before the per-segment choice

    def run(p):
        return sample(p, [0, 1, 2, 3], steps=STEPS, guidance_scale=2.0, seed=7, progress=False)[0]

    best = soda.calibrate_soda(pipe, run, prof, soda.CalibrationConfig(fewer=2, progress=False), speedup=1.6,
                               lam=1.0)
    cal = best.meta["calibration"]
    rows, chosen = cal["rows"], cal["chosen"]
    n1 = len(scheds)
    first_pick = prefer(rows[:n1], 1.0)
    # then the kept schedule with cached gating ("now" preferred within the noise)
    assert rows[n1]["gating"] == "cached" and rows[n1]["anchors"] == rows[first_pick]["anchors"]
    kept = (first_pick, n1)[prefer([rows[first_pick], rows[n1]], 1.0)]
    j = prefer([rows[kept], *rows[n1 + 1:]], 2.0)  # pruning: 2 SE
    assert chosen == (kept if j == 0 else n1 + j)
    assert cal["margin_z"] == min(r["z_vs_chosen"] for i, r in enumerate(rows) if i != chosen)


def _synthetic_profile(e_cache: torch.Tensor) -> Profile:
    """A profile with given cache errors (pruning never pays, unit costs): for schedule tests."""
    t, layers, mods, ages = e_cache.shape
    return Profile(e_cache=e_cache, e_cache_std=torch.zeros_like(e_cache),
                   e_prune=(e_cache * 2)[..., None, None], module_flops=torch.ones(layers, mods, 2),
                   module_ms=torch.ones(mods, 2), step_flops=float(layers * mods) + 1, step_ms=float(layers * mods) + 1,
                   reuse_ms=1.0, meta={"modules": ["attn", "mlp"][:mods], "intervals": list(range(1, ages + 1)),
                                       "ratios": [0.5], "token_scores": ["delta"], "num_tokens": 16})


def test_spread_holds_the_dp_schedule_near_even_gaps():
    g = torch.Generator().manual_seed(3)
    t_steps = 12
    # cheap early steps: the free DP leaves a long gap there
    e = torch.rand(t_steps, 2, 2, 6, generator=g) * torch.linspace(0.01, 3, t_steps)[:, None, None, None]
    e[0] = float("nan")
    prof = _synthetic_profile(e)
    free = soda.plan(soda.Config(anchors=4, prune=False), prof)
    even = soda.plan(soda.Config(anchors=4, prune=False, spread=1.0), prof)
    wide = soda.plan(soda.Config(anchors=4, prune=False, spread=1.5), prof)
    assert int(soda.ages_of(free.anchors).max()) + 1 > 3 * 1.5  # the free DP does go long
    assert int(soda.ages_of(even.anchors).max()) + 1 <= 3
    assert int(soda.ages_of(wide.anchors).max()) + 1 <= math.ceil(1.5 * 3)
    assert even.meta["predicted"]["error"] >= free.meta["predicted"]["error"]
    # a spread whose bound overflows to infinity is no bound, not an OverflowError
    huge = soda.plan(soda.Config(anchors=4, prune=False, spread=3e307), prof)
    assert torch.equal(huge.anchors, free.anchors)
    with pytest.raises(ValueError, match="spread"):
        soda.Config(speedup=2, spread=0.5)


def test_schedules_and_two_round_calibration(tiny_profile):
    pipe, prof = tiny_profile

    def run(p):
        return sample(p, [0, 1], steps=STEPS, guidance_scale=2.0, seed=7, progress=False)[0]

    scheds = soda.schedules(soda.Config(speedup=1.6), prof)
    assert scheds and all(p.pruned_modules() == 0 for p in scheds)
    # each distinct (schedule, filler) once: reuse, forecast, and the per-segment choice where it
    # differs from both
    assert len({(tuple(p.anchors.tolist()), tuple(p.fill_grid().flatten().tolist())) for p in scheds}) == len(scheds)
    assert {p.forecast for p in scheds if p.fill is None} == {0, 1}
    forced = soda.schedules(soda.Config(speedup=1.6, forecast=1), prof)
    assert forced and all(p.forecast == 1 and p.fill is None for p in forced)
    assert len(forced) < len(scheds)
    assert all(p.meta["predicted"]["speedup_flops"] >= 1.6 * (1 - 1e-9) for p in scheds)
    # within=0: the closest plan whatever the noise (the preference rule: below)
    # (in both rounds)
    closest = soda.CalibrationConfig(fewer=2, progress=False, within=0.0, prune_within=0.0)
    best = soda.calibrate_soda(pipe, run, prof, closest, speedup=1.6, lam=1.0)
    cal = best.meta["calibration"]
    rows = cal["rows"]
    assert len(rows) >= len(scheds) and rows[cal["chosen"]]["score"] == min(r["score"] for r in rows)
    assert rows[cal["chosen"]]["anchors"] == int(best.anchors.sum())
    # the second round prunes on the spread the first round kept
    first_best = min(rows[:len(scheds)], key=lambda r: r["score"])
    # (and the filler it kept: a per-segment choice may find nothing to forecast on fewer anchors)
    kept = {first_best["forecast"]} | ({0} if first_best["forecast"] == "segment" else set())
    assert all(r["spread"] == first_best["spread"] and r["forecast"] in kept and r["pricing"] == first_best["pricing"]
               for r in rows[len(scheds):])
    assert (best.forecast if best.fill is None else "segment") == rows[cal["chosen"]]["forecast"]
    # between the rounds, the kept schedule with the gates its outputs were computed with
    assert all(r["gating"] == "now" for r in rows[:len(scheds)])
    gated = rows[len(scheds)]
    assert gated["gating"] == "cached" and gated["anchors"] == first_best["anchors"]
    assert gated["forecast"] == first_best["forecast"] and gated["score"] != first_best["score"]
    kept_gating = min((first_best, gated), key=lambda r: r["score"])["gating"]
    assert all(r["gating"] == kept_gating for r in rows[len(scheds) + 1:]) and best.gating == rows[cal["chosen"]]["gating"]
    apply(pipe, best)
    got = run(pipe)
    remove(pipe)
    full = run(pipe)
    assert rows[cal["chosen"]]["mse"] == pytest.approx(float((got.double() - full.double()).pow(2).mean()), rel=1e-9)


@pytest.mark.parametrize("target", [1.25, 1.19])
def test_timed_calibration_keeps_the_closest_plan_that_is_fast_enough(tiny_profile, target):
    """A wall-clock budget: candidates are timed from the lowest MSE up and the first that reaches
    the target speed is kept.  The timed run here sleeps in proportion to the applied plan's anchor
    count plus one, so its measured speedup is about STEPS / (anchors + 1) whatever the machine's
    load: 7 anchors run at 1.0x, 6 at 1.14x, 5 at 1.33x.  For 1.25x, 6 anchors fall short and 5
    reach it; for 1.19x, 6 anchors fall short by less than the noise allowance (timed again, with
    more pairs) while 5 overshoot by far more: the near miss is kept."""
    import time

    pipe, prof = tiny_profile
    # the latency model from costs proportional to FLOPs (the profiled times of a tiny model on a
    # shared machine are too noisy to decide whether 1.2x is affordable)
    prof = timed_like_flops(prof)

    def run(p):
        return sample(p, [0, 1], steps=STEPS, guidance_scale=2.0, seed=7, progress=False)[0]

    def timed(p):
        state = state_of(p)
        time.sleep(0.02 * (int(state.plan.anchors.sum()) + 1 if state is not None else STEPS))

    measure = soda.CalibrationConfig(fewer=1, more=2, timed=timed, repeats=1, progress=False)
    best = soda.calibrate_soda(pipe, run, prof, measure, latency_speedup=target, lam=1.0)
    cal = best.meta["calibration"]
    rows = cal["rows"]
    assert cal["timed"] == {"target": target, "tolerance": 0.03, "repeats": 1, "runtime": RUNTIME_REVISION}
    chosen = rows[cal["chosen"]]
    assert chosen["anchors"] == int(best.anchors.sum())
    assert STEPS / (chosen["anchors"] + 1) == pytest.approx(chosen["speedup_measured"], rel=0.25)
    timed_rows = [r for r in rows if "speedup_measured" in r]
    if target == 1.25:
        assert chosen["anchors"] == 5 and chosen["speedup_measured"] >= target * 0.97
        # every candidate closer to the full model was timed and found too slow
        assert all(r["speedup_measured"] < target * 0.97 for r in timed_rows if r["score"] < chosen["score"])
        assert chosen["timing_pairs"] == 1
    else:
        assert chosen["anchors"] == 6 and target * 0.97 ** 2 <= chosen["speedup_measured"] < target * 0.97
        assert chosen["timing_pairs"] == 3, "a near miss is timed again"
        assert any(r["anchors"] == 5 and r["speedup_measured"] > target * 1.03 for r in timed_rows)
    assert max(r["anchors"] for r in rows) == rows[0]["anchors"] + 2, "more anchors than the model affords offered"
    # a target the latency model affords but no plan reaches in this timed run (each plan costs
    # more than the full model): the fastest measured plan
    def slow(p):
        state = state_of(p)
        time.sleep(0.02 * (int(state.plan.anchors.sum()) + 6 if state is not None else STEPS))

    far = soda.calibrate_soda(pipe, run, prof, latency_speedup=1.2, lam=1.0, fewer=1, more=1, timed=slow,
                              repeats=1, progress=False)
    frows = far.meta["calibration"]["rows"]
    fastest = max((r for r in frows if "speedup_measured" in r), key=lambda r: r["speedup_measured"])
    assert frows[far.meta["calibration"]["chosen"]] is fastest
    with pytest.raises(ValueError, match="latency_speedup"):
        soda.calibrate_soda(pipe, run, prof, speedup=1.2, timed=timed, progress=False)
    assert state_of(pipe) is None, "calibration must leave the pipeline unplanned"


def test_timed_calibration_times_caching_only_first_within_the_noise(tiny_profile):
    """A timed search tries a pruning plan before a caching-only one only where it measures closer
    beyond ``prune_within`` standard errors: within the noise the caching-only plan is timed first
    and kept when fast enough."""
    import time

    from ditaccel.methods.soda.calibration import _fastest_enough, timing_order

    base = [-10.0, -10.2, -9.9, -10.1]

    def row(shift, pruned):
        samples = [b + d for b, d in zip(base, shift)]
        return {"score": sum(samples) / len(samples), "score_samples": samples, "pruned_modules": pruned}

    rows = [row([0, 0, 0, 0], 0),                      # caching only
            row([-0.3, 0.2, -0.25, 0.15], 5),          # prunes, 0.05 closer: 0.4 SE
            row([-0.5, -0.6, -0.55, -0.5], 9),         # prunes, 0.54 closer: far beyond the noise
            row([1.0, 1.1, 0.9, 1.05], 0)]             # caching only, far worse
    assert timing_order(rows, [0, 1, 2, 3], 2.0) == [2, 0, 1, 3]
    assert timing_order(rows, [0, 1, 2, 3], 0.0) == [2, 1, 0, 3], "0: the plain score order"
    assert timing_order(rows, [1, 3], 2.0) == [1, 3], "demoted only behind caching-only plans it ties"

    pipe, prof = tiny_profile
    cands = soda.candidates(soda.Config(speedup=1.6, lam=1.0), timed_like_flops(prof), fewer=1)
    cache_only = cands[0]
    pruning = next(c for c in cands[1:] if c.pruned_modules() > 0)

    def timed(p):  # every plan fast enough
        time.sleep(0.01 * (1 if state_of(p) is not None else STEPS))

    for within, kept in ((2.0, cache_only), (0.0, pruning)):
        two = [dict(rows[0]), dict(rows[1])]
        p, i = _fastest_enough(pipe, timed, [(0, cache_only), (1, pruning)], two, 1.5, 0.03, 1, False, within)
        assert p is kept and i == (0 if kept is cache_only else 1)
        assert ["speedup_measured" in r for r in two] == [i == 0, i == 1], "only the kept plan was timed"
    assert state_of(pipe) is None


def test_bad_budgets_are_refused():
    with pytest.raises(ValueError, match="give a budget"):
        soda.Config()
    with pytest.raises(ValueError, match="> 1"):
        soda.Config(speedup=0.5)
    with pytest.raises(ValueError, match="at most one"):
        soda.Config(speedup=2, latency_speedup=2)


@pytest.mark.parametrize("name", ["PixArtAlphaPipeline", "StableDiffusion3Pipeline", "FluxPipeline"])
def test_soda_profile_plan_apply_on_text_to_image_pipelines(name):
    """profile -> plan -> apply through unmodified pipelines driven by a run function; the
    plan's predicted FLOPs are what the runtime counts."""
    from tests.archs import ARCHS, TOKENS

    pipe, call = ARCHS[name]()
    pipe.set_progress_bar_config(disable=True)
    steps = 6
    prof = profile(pipe, lambda p: call(p, 2, 0, steps), num_steps=steps, num_tokens=TOKENS.get(name),
                   intervals=(1, 2), ratios=(0.25, 0.5), timing_repeats=1, progress=False,
                   description={"sampler": "pipeline default"})
    assert torch.isfinite(prof.e_cache[1:, ..., 0]).all()
    plan = soda.plan(soda.Config(speedup=1.4), prof)
    ref = torch.as_tensor(call(pipe, 2, 0, steps))
    apply(pipe, plan)
    state_of(pipe).count_flops = True
    out = torch.as_tensor(call(pipe, 2, 0, steps))
    recs = state_of(pipe).records
    remove(pipe)
    assert out.shape == ref.shape and torch.isfinite(out).all() and not torch.equal(out, ref)
    counted = sum(r.flops / r.rows for r in recs) / (len(recs) // steps)  # per row, per branch
    assert counted == pytest.approx(plan.meta["predicted"]["flops"], rel=1e-6)


def test_bench_keeps_calibrated_soda_plans_for_later_runs(tiny_profile, tmp_path):
    from ditaccel import bench
    from ditaccel.plan import Plan

    pipe, prof = tiny_profile
    calls = []

    def run(p):
        calls.append(1)
        return sample(p, [0, 1], steps=STEPS, guidance_scale=2.0, seed=7, progress=False)[0]

    def entry():
        (e,) = bench.method_entries(pipe, STEPS, methods=["soda"], sweeps={"soda": (1.6,)}, profile=prof,
                                    calibration_run=run, plan_dir=tmp_path)
        e.prepare(pipe)(pipe)()  # calibrate (or load), attach, detach
    entry()
    n = len(calls)
    path = tmp_path / "soda-speedup1.6.json"
    assert n > 2 and path.exists() and Plan.load(path).meta["calibration"]["samples"] == 2
    entry()
    assert len(calls) == n  # loaded, not calibrated again
    doc = json.loads(path.read_text())
    doc["meta"]["fingerprint"] = "another model"
    path.write_text(json.dumps(doc))
    entry()
    assert len(calls) > n  # a plan for another model is not taken


def test_an_unreachable_budget_fails_before_sampling_and_the_bench_skips_it_once(tiny_profile):
    from ditaccel import bench

    pipe, prof = tiny_profile
    calls = []

    def run(p):
        calls.append(1)
        return sample(p, [0, 1], steps=STEPS, guidance_scale=2.0, seed=7, progress=False)[0]

    with pytest.raises(soda.BudgetUnreachable, match="no plan meets this budget"):
        soda.calibrate_soda(pipe, run, prof, speedup=50.0, progress=False)
    assert calls == [], "an unreachable budget is refused before any calibration sample"
    assert issubclass(soda.BudgetUnreachable, ValueError)  # the CLI's one-line errors still catch it

    entries = bench.method_entries(pipe, STEPS, methods=["soda"], sweeps={"soda": (1.6, 50.0)}, profile=prof,
                                   calibration_run=run)
    seen = []
    out = bench.measure(pipe, run, None, entries,
                        config=bench.MeasureConfig(repeats=0, progress=False, on_row=seen.append))
    assert [(r["method"], r["value"]) for r in out["rows"]] == [("full", None), ("soda", 1.6)]
    assert out["skipped"] == ["soda: speedup=50: no plan meets this budget with the profiled cache ages; "
                              "profile longer intervals or ask for a smaller speedup"]
    assert seen[-1] == {"method": "soda", "value": 50.0, "skipped": out["skipped"][0]}
    # resumed from what on_row saw: neither configuration is tried again, the skip is reported again
    n = len(calls)
    again = bench.measure(pipe, run, None, entries, config=bench.MeasureConfig(repeats=0, progress=False, resumed=seen))
    assert again["skipped"] == out["skipped"] and len(again["rows"]) == 2
    assert len(calls) == n + 1, "only the full model's scored run"
