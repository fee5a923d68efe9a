"""Collapsed reusing steps (runtime.collapse): a step reusing every module of every block is one
weighted sum of the cached outputs.  Same images as the block-by-block path (within rounding), on
DiT and PixArt, batched CFG or one call per branch, with forecasts, under timesteps or labels the
gate table could not predict; and a collapsed call's dispatched ops grow by one or two per cached
output with depth (counted exactly), not by a block's dozens."""

import dataclasses

import pytest
import torch

from ditaccel.methods import make_plan, model_shape
from ditaccel.metrics import OpCounter
from ditaccel.plan import FULL, REUSE, Plan
from ditaccel.runtime import apply, remove, state_of
from ditaccel.runtime.state import PlanMismatch
from ditaccel.runtime.collapse import collapsible_steps
from tests import archs

T = 6


def _images(pipe, call, plan, collapse: bool, **options):
    apply(pipe, plan, collapse=collapse, **options)
    try:
        with torch.no_grad():
            return torch.as_tensor(call(pipe, 2, 0, T))
    finally:
        remove(pipe)


def _mixed_fill(shape):
    """FORA interval 2 with only the first block's first module forecasting (Plan.fill)."""
    plan = make_plan("fora", shape, interval=2)
    fill = torch.zeros_like(plan.tokens)
    fill[:, 0, 0] = 1
    return dataclasses.replace(plan, fill=fill)


PLANS = {
    "fora-2": lambda shape: make_plan("fora", shape, interval=2),
    "fora-2-mixed-fill": _mixed_fill,
    "fora-3-forecast": lambda shape: make_plan("fora", shape, interval=3, forecast=1),
    "delta-dit": lambda shape: make_plan("delta-dit", shape, interval=3, cached_blocks=1.0),
}


@pytest.mark.parametrize("arch", ["dit_pixel", "dit_diffusers", "pixart", "sd3"])
@pytest.mark.parametrize("name", list(PLANS))
def test_collapsed_steps_give_the_block_by_block_images(arch, name):
    pipe, call = getattr(archs, arch)()
    pipe.set_progress_bar_config(disable=True)
    plan = PLANS[name](model_shape(pipe.transformer, T))
    assert any(collapsible_steps(plan))
    ref = _images(pipe, call, plan, collapse=False)
    got = _images(pipe, call, plan, collapse=True)
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=0)
    full = _images(pipe, call, dataclasses.replace(plan, anchors=torch.ones(T, dtype=torch.bool),
                                                   tokens=torch.full_like(plan.tokens, FULL)), collapse=True)
    assert not torch.equal(got, full)  # the plan did reuse something


def _whole_contribution_images(pipe, call, plan):
    """Independent of the runtime: the plain model, whose last block's image output on each of the
    plan's collapsed steps is replaced by ``x_0 + F(R)``, ``R`` = (the last block's image output) -
    (the first block's image input) at the plan's anchors (the whole stack's gated contribution),
    ``F`` reusing the last one or (``plan.forecast``) extrapolating the last two in the step index."""
    from ditaccel.runtime.adapters import find_blocks
    from ditaccel.runtime.hooks import _named, positional

    blocks = find_blocks(pipe.transformer)
    (_, first, spec), (_, last, _) = blocks[0], blocks[-1]
    collapsed, seen, at = collapsible_steps(plan), [], {"step": -1}

    def count(m, a, k):
        at["step"] += 1

    def keep_x0(m, a, k):
        at["x0"] = _named(positional(type(first)), a, k)[spec.image_arg]

    def replace_out(m, a, k, out):
        image = out if spec.image_output is None else out[spec.image_output]
        s = at["step"]
        if plan.anchors[s]:
            seen.append((s, image - at["x0"]))
            return None
        if not collapsed[s]:
            return None
        (b, rb), a_ = seen[-1], (seen[-2] if len(seen) > 1 and plan.forecast else None)
        r = rb if a_ is None else rb + (s - b) / (b - a_[0]) * (rb - a_[1])
        new = at["x0"] + r
        if spec.image_output is None:
            return new
        out = list(out)
        out[spec.image_output] = new
        return tuple(out)

    handles = [pipe.transformer.register_forward_pre_hook(count, with_kwargs=True),
               first.register_forward_pre_hook(keep_x0, with_kwargs=True),
               last.register_forward_hook(replace_out, with_kwargs=True)]
    try:
        with torch.no_grad():
            images = torch.as_tensor(call(pipe, 2, 0, T))
    finally:
        for h in handles:
            h.remove()
    assert at["step"] == T - 1  # one call per step (guidance batched)
    return images


@pytest.mark.parametrize("arch", ["dit_pixel", "dit_diffusers", "pixart", "sd3"])
@pytest.mark.parametrize("name", ["fora-2", "fora-3-forecast", "delta-dit"])
def test_cached_gating_reuses_each_blocks_whole_gated_contribution(arch, name):
    """``Plan.gating == "cached"``: a collapsed step adds the blocks' outputs with the gates they
    were computed with: the images of replacing the stack's output by its input plus the reused
    (or extrapolated) contribution of the whole stack at the anchors; not those of this step's
    gates; and the gates of steps no cache holds any more are dropped."""
    from ditaccel.runtime.collapse import COLLAPSE_HOOK

    pipe, call = getattr(archs, arch)()
    pipe.set_progress_bar_config(disable=True)
    plan = dataclasses.replace(PLANS[name](model_shape(pipe.transformer, T)), gating="cached")
    ref = _whole_contribution_images(pipe, call, plan)
    apply(pipe, plan)
    collapse = pipe.transformer.transformer_blocks[0]._diffusers_hook.get_hook(COLLAPSE_HOOK).collapse
    try:
        with torch.no_grad():
            got = torch.as_tensor(call(pipe, 2, 0, T))
    finally:
        remove(pipe)
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=0)
    now = _images(pipe, call, dataclasses.replace(plan, gating="now"), collapse=True)
    assert (got - now).abs().max() > 1e-4  # the gates differ between steps: so do the images
    assert collapse._seen and all(len(steps) <= 2 for _, steps in collapse._seen.values())


def test_cached_gating_needs_the_collapsed_path(tiny_pipe):
    plan = dataclasses.replace(make_plan("fora", model_shape(tiny_pipe.transformer, T), interval=2), gating="cached")
    for options, hint in (({"collapse": False}, "collapse=True"), ({"compile": True}, "without compile")):
        with pytest.raises(PlanMismatch, match=hint):
            apply(tiny_pipe, plan, **options)
        assert state_of(tiny_pipe) is None
    apply(tiny_pipe, dataclasses.replace(plan, gating="now"), collapse=False)  # "now" runs either way
    remove(tiny_pipe)


def test_a_per_entry_fill_forecasts_exactly_where_it_says(tiny_pipe):
    """``Plan.fill`` all ones runs as ``forecast=1``, all zeros as ``forecast=0`` (bit for bit),
    and a mixed one is neither, on both paths."""
    call = archs.dit_pixel()[1]
    shape = model_shape(tiny_pipe.transformer, T)
    base = make_plan("fora", shape, interval=2)
    for collapse in (False, True):
        run = {f: _images(tiny_pipe, call, dataclasses.replace(base, forecast=f), collapse) for f in (0, 1)}
        ones = _images(tiny_pipe, call, dataclasses.replace(base, fill=torch.ones_like(base.tokens)), collapse)
        zeros = _images(tiny_pipe, call, dataclasses.replace(base, fill=torch.zeros_like(base.tokens)), collapse)
        mixed = _images(tiny_pipe, call, _mixed_fill(shape), collapse)
        assert torch.equal(ones, run[1]) and torch.equal(zeros, run[0])
        assert not torch.equal(mixed, run[0]) and not torch.equal(mixed, run[1])


def test_collapse_runs_only_where_every_module_reuses(tiny_pipe):
    shape = model_shape(tiny_pipe.transformer, T)
    plan = make_plan("toca", shape, interval=3, ratio=0.5)  # partial steps: nothing collapses
    assert not any(collapsible_steps(plan))
    tokens = plan.tokens.clone()
    tokens[2] = REUSE
    mixed = dataclasses.replace(plan, tokens=tokens)
    assert collapsible_steps(mixed) == [False, False, True, False, False, False]
    ref = _images(tiny_pipe, archs.dit_pixel()[1], mixed, collapse=False)
    calls = []
    apply(tiny_pipe, mixed)
    handle = tiny_pipe.transformer.transformer_blocks[1].register_forward_pre_hook(
        lambda m, a: calls.append(state_of(tiny_pipe).step))
    with torch.no_grad():
        got = torch.as_tensor(archs.dit_pixel()[1](tiny_pipe, 2, 0, T))
    handle.remove()
    remove(tiny_pipe)
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=0)
    # block 1's own computation is skipped (its hook passes the input through) only at step 2
    assert calls == [0, 1, 2, 3, 4, 5]  # (a forward pre-hook runs before the diffusers hooks)
    assert state_of(tiny_pipe) is None


def _call_ops(pipe, plan, labels=(0, 1)):
    """Ops dispatched by each transformer call of one trajectory under ``plan``."""
    per_call = []

    def pre(m, a, k):
        m._ops = OpCounter()
        m._ops.__enter__()

    def post(m, a, k, o):
        m._ops.__exit__(None, None, None)
        per_call.append(m._ops.total)

    tf = pipe.transformer
    apply(pipe, plan)
    handles = [tf.register_forward_pre_hook(pre, with_kwargs=True), tf.register_forward_hook(post, with_kwargs=True)]
    try:
        with torch.no_grad():
            pipe(class_labels=list(labels), guidance_scale=2.0, num_inference_steps=T, output_type="np",
                 generator=torch.Generator().manual_seed(0))
    finally:
        for h in handles:
            h.remove()
        remove(pipe)
    return per_call


@pytest.mark.parametrize("gating", ["now", "cached"])
@pytest.mark.parametrize("forecast", [0, 1])
def test_a_collapsed_call_dispatches_the_same_ops_whatever_the_depth(forecast, gating):
    """Counted exactly: a reusing call after the first costs what the patch embedding, the
    output head and the weighted sum cost, the same with 2 blocks or 6; an anchor call grows
    with depth."""
    from diffusers import DDIMScheduler

    from ditaccel.models.reference import NOISE_SCHEDULE
    from ditaccel.pipeline import DiTPixelPipeline
    from tests.conftest import tiny_dit

    ops = {}
    for layers in (2, 6):
        tf = tiny_dit()
        if layers != 2:
            torch.manual_seed(0)
            from diffusers import DiTTransformer2DModel

            tf = DiTTransformer2DModel(**{**dict(tf.config), "num_layers": layers}).eval()
        pipe = DiTPixelPipeline(transformer=tf, scheduler=DDIMScheduler(**NOISE_SCHEDULE))
        pipe.set_progress_bar_config(disable=True)
        plan = dataclasses.replace(make_plan("fora", model_shape(tf, T), interval=3, forecast=forecast), gating=gating)
        ops[layers] = _call_ops(pipe, plan)
    two, six = ops[2], ops[6]
    assert six[0] > two[0] + 4 * 40  # an anchor: dozens of ops per block
    # step 1 reads the gates of all reusing steps from the conditioning chain tables built at
    # step 0: a handful of ops per block, no call of its conditioning norm
    assert six[1] - two[1] <= (6 - 2) * (2 + 6), (six[1], two[1])
    # steps 2, 4, 5 reuse after that: one fused multiply-add per
    # cached output (2 per block), two per cached output where it forecasts from two full outputs
    # (steps 4 and 5, after anchors 0 and 3)
    per_output = {2: 1, 4: 1 + forecast, 5: 1 + forecast}
    for s, k in per_output.items():
        assert six[s] - two[s] == (6 - 2) * 2 * k, (s, six[s], two[s])
    assert max(six[s] for s in (2, 4, 5)) < six[0] / 6


def test_collapse_follows_calls_the_gate_table_cannot_predict(tiny_pipe):
    """Timesteps other than the scheduler's, and labels that change part way: the gates are
    computed for the call itself, and the images match the block-by-block path."""
    call = archs.dit_pixel()[1]
    plan = make_plan("fora", model_shape(tiny_pipe.transformer, T), interval=3)

    for change in (lambda i, kw: {**kw, "timestep": kw["timestep"] + 1},
                   lambda i, kw: {**kw, "class_labels": kw["class_labels"].flip(0) if i % T >= 3 else kw["class_labels"]}):
        seen = []

        def pre(m, args, kwargs, change=change):
            seen.append(None)
            return args, change(len(seen) - 1, dict(kwargs))

        handle = tiny_pipe.transformer.register_forward_pre_hook(pre, with_kwargs=True)
        try:
            seen.clear()
            ref = _images(tiny_pipe, call, plan, collapse=False)
            seen.clear()
            got = _images(tiny_pipe, call, plan, collapse=True)
        finally:
            handle.remove()
        torch.testing.assert_close(got, ref, atol=2e-5, rtol=0)


def _block_calls(pipe, call, plan, collapse: bool, pre=None):
    """Images and the steps at which each block's own forward ran (beneath the collapse hook)."""
    ran = {i: [] for i in range(len(pipe.transformer.transformer_blocks))}
    apply(pipe, plan, collapse=collapse)
    st = state_of(pipe)
    handles = [b.attn.register_forward_pre_hook(lambda m, a, i=i: ran[i].append(st.step))
               for i, b in enumerate(pipe.transformer.transformer_blocks)]
    # (step, rows of the conditioning) of each conditioning-norm call, per block
    ran["norm"] = {i: [] for i in ran}
    handles += [b.norm1.register_forward_pre_hook(
        lambda m, a, k, i=i: ran["norm"][i].append((st.step, k.get("emb", a[1] if len(a) > 1 else None).shape[0])),
        with_kwargs=True) for i, b in enumerate(pipe.transformer.transformer_blocks) if hasattr(b, "norm1")]
    ran["embed"] = []  # (step, rows) of each time SD3's time_text_embed computes (its submodule runs)
    if hasattr(pipe.transformer, "time_text_embed"):
        handles.append(pipe.transformer.time_text_embed.timestep_embedder.register_forward_pre_hook(
            lambda m, a: ran["embed"].append((st.step, a[0].shape[0]))))
    if pre is not None:
        handles.append(pipe.transformer.register_forward_pre_hook(pre, with_kwargs=True))
    try:
        with torch.no_grad():
            return torch.as_tensor(call(pipe, 2, 0, T)), ran
    finally:
        for h in handles:
            h.remove()
        remove(pipe)


def test_sd3_collapses_its_reusing_steps_without_the_text_stream():
    """SD3's joint blocks: on a collapsed step no block runs its own forward (neither stream), and
    the images are the block-by-block ones; where the step could not run the text stream is what
    the transformer discards."""
    pipe, call = archs.sd3()
    pipe.set_progress_bar_config(disable=True)
    plan = make_plan("fora", model_shape(pipe.transformer, T), interval=3, forecast=1)
    ref, _ = _block_calls(pipe, call, plan, collapse=False)
    got, ran = _block_calls(pipe, call, plan, collapse=True)
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=0)
    # the attention's own pre-hook runs when the block runs (its cached output is returned
    # beneath it): only at the anchors
    assert ran[0] == ran[1] == [0, 3]
    # the gates of all collapsed steps (1, 2, 4, 5) come from one conditioning-norm call per block
    # at the first of them, on the embeddings the transformer makes for their timesteps
    rows = ran["norm"][0][0][1]
    assert ran["norm"][0] == ran["norm"][1] == [(0, rows), (1, 4 * rows), (3, rows)]
    # each step's embedding is made once: the transformer's own call where the table does not
    # hold it, the later collapsed steps' (2, 4, 5) in one call at step 1
    assert ran["embed"] == [(0, rows), (1, rows), (1, 3 * rows), (3, rows)]
    assert state_of(pipe) is None


def _sd3_with_changed_calls(change):
    """SD3 under FORA interval 3 with ``change(step, kwargs)`` applied to each transformer call's
    keyword arguments: asserts that the collapsed run gives the block-by-block images and that the
    change did change them; returns the collapsed run's block calls (:func:`_block_calls`)."""
    pipe, call = archs.sd3()
    pipe.set_progress_bar_config(disable=True)
    plan = make_plan("fora", model_shape(pipe.transformer, T), interval=3)
    counter = []

    def pre(m, args, kwargs):
        counter.append(None)
        return args, change((len(counter) - 1) % T, kwargs)

    ref, _ = _block_calls(pipe, call, plan, collapse=False, pre=pre)
    counter.clear()
    got, ran = _block_calls(pipe, call, plan, collapse=True, pre=pre)
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=0)
    plain, _ = _block_calls(pipe, call, plan, collapse=True)
    assert (got - plain).abs().max() > 1e-3  # the change did change the images
    return ran


def test_sd3_gate_table_follows_the_calls_conditioning():
    """A call whose pooled text embedding differs from the one the gate table was made with (here
    on step 4 only) gets gates of its own: the images stay the block-by-block ones."""
    ran = _sd3_with_changed_calls(lambda step, kwargs: (
        {**kwargs, "pooled_projections": kwargs["pooled_projections"] + 1.0} if step == 4 else kwargs))
    assert [s for s, _ in ran["norm"][0]] == [0, 1, 3, 4]


def test_sd3_calls_that_skip_blocks_run_them():
    """A call with ``skip_layers`` (SD3's skip-layer guidance) leaves a block out of the stack:
    the collapse, which sums every block's cached outputs, steps aside and the blocks run."""
    ran = _sd3_with_changed_calls(lambda step, kwargs: {**kwargs, "skip_layers": [1]} if step % 3 else kwargs)
    assert ran[0] == list(range(T))  # block 0 ran on every step, the reusing ones too


def test_collapse_with_one_call_per_guidance_branch(tiny_pipe):
    """Pipelines calling the transformer once per branch: each branch stacks its own caches."""
    plan = make_plan("fora", model_shape(tiny_pipe.transformer, T), interval=3, forecast=1)
    tf, sched = tiny_pipe.transformer, tiny_pipe.scheduler
    results = {}
    for collapse in (False, True):
        apply(tiny_pipe, plan, collapse=collapse)
        sched.set_timesteps(T)
        x = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            for t in sched.timesteps:
                cond, uncond = (tf(x, timestep=t[None], class_labels=torch.tensor([c])).sample for c in (1, 4))
                x = sched.step(uncond + 2.0 * (cond - uncond), t, x).prev_sample
        results[collapse] = x
        remove(tiny_pipe)
    torch.testing.assert_close(results[True], results[False], atol=2e-5, rtol=0)


def test_per_step_records_say_what_was_reused(tiny_pipe):
    from ditaccel.sampling import sample

    plan = make_plan("fora", model_shape(tiny_pipe.transformer, T), interval=3)
    apply(tiny_pipe, plan)
    _, stats = sample(tiny_pipe, [0], steps=T, guidance_scale=2.0, progress=False)
    remove(tiny_pipe)
    assert [r["anchor"] for r in stats.per_step] == [s % 3 == 0 for s in range(T)]
    assert all(r["attn"] == 0.0 and r["mlp"] == 0.0 for r in stats.per_step if not r["anchor"])
    assert stats.per_step[1]["flops"] > stats.per_step[2]["flops"]  # the gate table, built at step 1
