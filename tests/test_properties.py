"""Property-based tests (hypothesis): the DP, SODA budgets, and loaders fed random input."""

import itertools
import json
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ditaccel import io
from ditaccel.methods import soda
from ditaccel.plan import Plan, PlanError
from ditaccel.profiling import Profile, ProfileError

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _brute_force(cost, k):
    t_steps, max_len = cost.shape[0], cost.shape[1] - 1
    best = math.inf
    for rest in itertools.combinations(range(1, t_steps), k - 1):
        bounds = [0, *rest, t_steps]
        lens = [b - a for a, b in zip(bounds, bounds[1:])]
        if max(lens) <= max_len:
            best = min(best, sum(float(cost[a, n]) for a, n in zip(bounds, lens)))
    return best


@st.composite
def profiles(draw):
    """Random but well-formed profiles: positive errors that are NaN exactly where nothing was
    cached yet (t < interval), FLOPs that grow with the recomputed fraction."""
    t, layers, mods, ages = (draw(st.integers(3, 12)), draw(st.integers(1, 3)), draw(st.integers(1, 2)),
                             draw(st.integers(1, 4)))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 31 - 1)))
    e = torch.rand(t, layers, mods, ages, generator=g) + 1e-3
    for i in range(ages):
        e[: i + 1, ..., i] = float("nan")
    ratios = [0.25, 0.5]
    e_prune = e[..., None, None] * torch.rand(t, layers, mods, ages, 2, 1, generator=g)
    full = torch.rand(layers, mods, generator=g) + 0.5
    mf = torch.stack([full * r for r in ratios] + [full], dim=-1)
    rest = float(torch.rand((), generator=g)) * full.sum().item()
    prof = Profile(e_cache=e, e_cache_std=e * 0.1, e_prune=e_prune, module_flops=mf,
                   module_ms=torch.ones(mods, 3), step_flops=float(full.sum()) + rest,
                   step_ms=float(layers * mods) + 1.0, reuse_ms=1.0,
                   meta={"modules": ["attn", "mlp"][:mods], "intervals": list(range(1, ages + 1)),
                         "ratios": ratios, "token_scores": ["delta"], "num_tokens": 16})
    assert prof.problem() is None
    return prof


@SETTINGS
@given(t=st.integers(2, 9), max_len=st.integers(1, 4), seed=st.integers(0, 10 ** 6), data=st.data())
def test_dp_is_optimal_and_exact(t, max_len, seed, data):
    g = torch.Generator().manual_seed(seed)
    cost = torch.rand(t, max_len + 1, generator=g).double()
    for a in range(t):
        cost[a, t - a + 1:] = math.inf  # segments that run past the last step
    k = data.draw(st.integers(1, t))
    if math.ceil(t / max_len) > k:
        with pytest.raises(ValueError, match="cannot cover"):
            soda.dp_schedule(cost, k)
        return
    anchors, value = soda.dp_schedule(cost, k)
    idx = torch.nonzero(anchors).flatten().tolist()
    gaps = [b - a for a, b in zip(idx, [*idx[1:], t])]
    assert len(idx) == k and idx[0] == 0 and max(gaps) <= max_len
    assert value == pytest.approx(_brute_force(cost, k))


@SETTINGS
@given(prof=profiles(), frac=st.floats(0.0, 1.0), prune=st.booleans())
def test_every_reachable_speedup_gives_a_plan_that_meets_it(prof, frac, prune):
    t = prof.num_steps
    min_k = math.ceil(t / (max(prof.intervals) + 1))
    rest = prof.step_flops - float(prof.module_flops[..., -1].double().sum())  # as predict() sums them
    s_max = t * prof.step_flops / (min_k * prof.step_flops + (t - min_k) * rest)
    if s_max <= 1 + 1e-6:
        return
    target = 1 + 1e-6 + frac * (s_max - 1 - 1e-6)
    plan = soda.plan(soda.Config(speedup=target, prune=prune), prof)
    assert plan.meta["predicted"]["speedup_flops"] >= target * (1 - 1e-9)
    assert plan.num_steps == t and bool(plan.anchors[0])
    with pytest.raises(ValueError, match="no plan meets"):
        soda.plan(soda.Config(speedup=s_max * 1.01 + 0.01, prune=prune), prof)


JSON = st.recursive(st.none() | st.booleans() | st.integers(-10 ** 6, 10 ** 6) | st.floats(allow_nan=True)
                    | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                    max_leaves=12)
PLAN_KEYS = ["kind", "schema_version", "num_tokens", "modules", "anchors", "tokens", "route", "token_score",
             "method", "forecast", "meta"]


def _valid_plan_dict():
    plan = soda.plan(soda.Config(anchors=2), _fixed_profile())
    return plan.to_dict()


def _fixed_profile():
    e = torch.rand(6, 2, 2, 2, generator=torch.Generator().manual_seed(0)) + 0.01
    e[:1, ..., 0] = e[:2, ..., 1] = float("nan")
    return Profile(e_cache=e, e_cache_std=e, e_prune=e[..., None, None], module_flops=torch.ones(2, 2, 2),
                   module_ms=torch.ones(2, 2), step_flops=5.0, step_ms=5.0, reuse_ms=1.0,
                   meta={"modules": ["attn", "mlp"], "intervals": [1, 2], "ratios": [0.5],
                         "token_scores": ["delta"], "num_tokens": 16})


@SETTINGS
@given(doc=JSON)
def test_random_json_is_never_a_crash_in_the_plan_loader(doc):
    try:
        plan = Plan.from_dict(doc)
    except PlanError as e:  # our error, one line (anything else fails the test)
        assert str(e) and "\n" not in str(e)
        return
    assert Plan.from_dict(json.loads(plan.to_json())) == plan  # what loads is a whole plan


@SETTINGS
@given(edits=st.dictionaries(st.sampled_from(PLAN_KEYS), JSON, min_size=1, max_size=3))
def test_a_valid_plan_with_random_fields_loads_or_is_refused_with_our_error(edits):
    doc = {**_valid_plan_dict(), **edits}
    try:
        plan = Plan.from_dict(json.loads(json.dumps(doc)))
    except PlanError:
        return
    plan.validate()
    assert plan.num_steps == len(plan.anchors)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(meta=JSON, keep=st.booleans())
def test_random_metadata_is_never_a_crash_in_the_artifact_and_profile_loaders(tmp_path_factory, meta, keep):
    folder = tmp_path_factory.mktemp("a")
    prof = _fixed_profile()
    prof.save(folder / "p")
    tensors, header = io.read_tensors_and_metadata(folder / "p.safetensors")
    good = json.loads(header[io.META_KEY])
    doc = {**good, **meta} if keep and isinstance(meta, dict) else meta
    io.write_tensors(folder / "p.safetensors", tensors, {io.META_KEY: json.dumps(doc)})
    try:
        back = Profile.load(folder / "p")
    except (io.ArtifactError, ProfileError):
        return
    assert back.problem() is None
