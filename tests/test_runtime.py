import pytest
import torch

from ditaccel.plan import FULL, REUSE, Plan, full_plan
from ditaccel.runtime import apply, remove, state_of
from ditaccel.runtime.adapters import UnsupportedModel
from ditaccel.runtime.state import PlanMismatch
from ditaccel.sampling import sample

T, LAYERS, N = 4, 2, 16  # tiny DiT: 8x8 pixels, patch 2 -> 16 tokens


def _run(pipe, labels=(0, 1), seed=0):
    return sample(pipe, list(labels), steps=T, guidance_scale=2.0, seed=seed, progress=False,
                  count_flops=False)[0]


def _plan(fill, anchors=(True, False, True, False)):
    tokens = torch.full((T, LAYERS, 2), FULL)
    for t, a in enumerate(anchors):
        if not a:
            tokens[t] = fill
    return Plan(num_tokens=N, modules=("attn", "mlp"), anchors=list(anchors), tokens=tokens,
                token_score="delta")


def test_all_anchor_plan_and_remove_are_bit_identical(tiny_pipe):
    ref = _run(tiny_pipe)
    apply(tiny_pipe, full_plan(T, LAYERS, N))
    apply(tiny_pipe, full_plan(T, LAYERS, N))  # twice is safe
    assert torch.equal(_run(tiny_pipe), ref)
    apply(tiny_pipe, _plan(REUSE))
    cached = _run(tiny_pipe)
    assert not torch.equal(cached, ref)
    assert torch.equal(_run(tiny_pipe), cached)  # no state leaks between calls
    remove(tiny_pipe)
    assert state_of(tiny_pipe) is None
    assert torch.equal(_run(tiny_pipe), ref)


def _module_outputs(pipe, role_attr="ff"):
    """Per transformer call, the output of layer 0's module (hooked below our hooks)."""
    outs = []
    mod = getattr(pipe.transformer.transformer_blocks[0], role_attr)
    handle = mod.register_forward_hook(lambda m, i, o: outs.append(o.detach().clone()))
    return outs, handle


def test_reuse_returns_the_cached_output(tiny_pipe):
    apply(tiny_pipe, _plan(REUSE), collapse=False)
    outs, handle = _module_outputs(tiny_pipe)
    _run(tiny_pipe)
    handle.remove()
    assert len(outs) == T
    assert torch.equal(outs[1], outs[0]) and torch.equal(outs[3], outs[2])
    assert not torch.equal(outs[2], outs[0])
    rec = state_of(tiny_pipe).records
    assert [r.anchor for r in rec] == [True, False, True, False]
    assert rec[1].computed[(0, "mlp")] == 0 and rec[0].computed[(0, "mlp")] == N


@pytest.mark.parametrize("role,attr", [("mlp", "ff"), ("attn", "attn1")])
def test_partial_recompute_updates_exactly_the_chosen_tokens(tiny_pipe, role, attr):
    k = 5
    apply(tiny_pipe, _plan(k))
    outs, handle = _module_outputs(tiny_pipe, attr)
    inputs = []
    mod = getattr(tiny_pipe.transformer.transformer_blocks[0], attr)
    h2 = mod.register_forward_pre_hook(lambda m, a: inputs.append(a[0].detach().clone()))
    _run(tiny_pipe)
    handle.remove(), h2.remove()
    # Step 1 vs step 0: exactly k tokens per row changed ...
    changed = (outs[1] != outs[0]).any(-1)  # (B, N)
    assert changed.sum(1).tolist() == [k] * changed.shape[0]
    # ... and they hold what a full computation gives at those tokens.
    remove(tiny_pipe)
    with torch.no_grad():
        full = mod(inputs[1][:, :, :])  # inputs[1] is the full input the hooked module saw at step 1
    torch.testing.assert_close(outs[1][changed], full[changed], atol=1e-5, rtol=1e-5)
    # The selected tokens are those whose input moved most since step 0 (delta score).
    moved = (inputs[1] - inputs[0]).norm(dim=-1)
    top = moved.topk(k, dim=1).indices
    assert torch.equal(changed, torch.zeros_like(changed).scatter(1, top, True))


def test_a_sample_alone_equals_it_inside_a_batch(tiny_pipe):
    apply(tiny_pipe, _plan(5))
    batch = sample(tiny_pipe, [0, 1, 2], steps=T, seed=3, progress=False, count_flops=False)[0]
    alone = sample(tiny_pipe, [1], steps=T, seed=4, progress=False, count_flops=False)[0]
    torch.testing.assert_close(alone[0], batch[1], atol=1e-5, rtol=0)


def test_mismatched_plans_are_refused(tiny_pipe):
    with pytest.raises(PlanMismatch, match="3 layers but DiTTransformer2DModel has 2 blocks"):
        apply(tiny_pipe, full_plan(T, 3, N))
    with pytest.raises(PlanMismatch, match=r"acts on \['cross'\]"):
        apply(tiny_pipe, full_plan(T, LAYERS, N, modules=("attn", "cross", "mlp")))
    apply(tiny_pipe, full_plan(T + 1, LAYERS, N))
    with pytest.raises(PlanMismatch, match="plan is for 5 sampling steps but the scheduler runs 4"):
        _run(tiny_pipe)
    apply(tiny_pipe, full_plan(T, LAYERS, 64))
    with pytest.raises(PlanMismatch, match="64 image tokens"):
        _run(tiny_pipe)
    base = _plan(REUSE)
    plan = Plan(num_tokens=N, modules=base.modules, anchors=base.anchors, tokens=base.tokens,
                meta={"fingerprint": "0" * 16})
    with pytest.raises(PlanMismatch, match="another model"):
        apply(tiny_pipe, plan)


def test_bare_transformer_runs_beyond_plan_is_an_error(tiny_pipe):
    tf = tiny_pipe.transformer
    apply(tf, full_plan(2, LAYERS, N))
    x = torch.randn(1, 1, 8, 8)
    with torch.no_grad():
        for t in (900, 500):
            tf(x, timestep=torch.tensor([t]), class_labels=torch.tensor([0]))
        with pytest.raises(PlanMismatch, match="more than the plan's 2 steps"):
            tf(x, timestep=torch.tensor([100]), class_labels=torch.tensor([0]))
        tf(x, timestep=torch.tensor([900]), class_labels=torch.tensor([0]))  # a new trajectory
    assert state_of(tf).step == 0


def test_unsupported_model_names_supported_blocks():
    with pytest.raises(UnsupportedModel, match="supported block classes: BasicTransformerBlock"):
        apply(torch.nn.Linear(2, 2), full_plan(2, 1, 4))


def test_accounting_counts_plan_flops_per_step(tiny_pipe):
    _, full = sample(tiny_pipe, [0, 1, 2], steps=T, progress=False)
    apply(tiny_pipe, _plan(REUSE))
    _, batched = sample(tiny_pipe, [0, 1, 2], steps=T, progress=False)
    apply(tiny_pipe, _plan(REUSE), batch_conditioning=False)  # each step's own conditioning
    _, fast = sample(tiny_pipe, [0, 1, 2], steps=T, progress=False)
    # batched, the first step computes the blocks' conditioning of all steps (the first reusing
    # one the output head's of both reusing steps): the same FLOPs in all
    assert batched.flops == fast.flops
    assert batched.per_step[0]["flops"] > fast.per_step[0]["flops"]
    assert fast.per_step[1]["flops"] > batched.per_step[1]["flops"] > batched.per_step[3]["flops"]
    assert fast.method == "custom" and [r["anchor"] for r in fast.per_step] == [True, False, True, False]
    anchor_flops = fast.per_step[0]["flops"]
    # an anchor step costs what a full call costs (one image with CFG = 2 rows)
    assert anchor_flops * 3 == full.flops_per_call
    assert fast.per_step[1]["flops"] < 0.2 * anchor_flops  # only embeddings, norms, projections
    assert fast.flops == 3 * sum(r["flops"] for r in fast.per_step)
    assert fast.per_step[1]["mlp"] == 0.0 and fast.per_step[0]["attn"] == 1.0
    apply(tiny_pipe, _plan(4))
    _, part = sample(tiny_pipe, [0], steps=T, progress=False)
    assert part.per_step[1]["mlp"] == pytest.approx(4 / N)
    assert fast.flops / 3 < part.flops < full.flops / 3
    from ditaccel.runtime.summary import format_table
    table = format_table(part.per_step, ("attn", "mlp"))
    assert "25%" in table and table.count("\n") == T


def test_partial_joint_attention_matches_full_attention_at_selected_tokens():
    from diffusers import SD3Transformer2DModel

    from ditaccel.runtime.hooks import partial_joint_attention
    from ditaccel.tokens import gather_tokens as _gather

    torch.manual_seed(0)
    tf = SD3Transformer2DModel(sample_size=4, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                               attention_head_dim=8, num_attention_heads=2, joint_attention_dim=12,
                               caption_projection_dim=16, pooled_projection_dim=10, pos_embed_max_size=8)
    for block in tf.transformer_blocks:  # the last block is context_pre_only
        attn = block.attn
        x, ctx = torch.randn(2, 9, 16), torch.randn(2, 5, 16)
        idx = torch.tensor([[0, 4, 8], [1, 2, 7]])
        with torch.no_grad():
            full_img, full_txt = attn(hidden_states=x, encoder_hidden_states=ctx)
            img, txt = partial_joint_attention(attn, x, _gather(x, idx), ctx)
        torch.testing.assert_close(img, _gather(full_img, idx), atol=1e-5, rtol=1e-5)
        if full_txt is not None:
            torch.testing.assert_close(txt, full_txt, atol=1e-5, rtol=1e-5)


def _direct(pipe):
    """The unmodified pipeline call, with the pipeline's own scheduler."""
    return torch.as_tensor(pipe(class_labels=[0, 1], guidance_scale=2.0, num_inference_steps=T,
                                generator=torch.Generator().manual_seed(0), output_type="np").images)


def test_step_context_follows_the_pipeline_scheduler(tiny_pipe):
    apply(tiny_pipe, _plan(REUSE))
    sched = tiny_pipe.scheduler
    assert "set_timesteps" in vars(sched) and "step" in vars(sched)  # the context's wrappers
    # A pipeline call that dies half-way leaves a half-filled cache behind; the next call starts
    # from a fresh trajectory because its set_timesteps begins one.
    calls = []
    original_step = sched.step

    def failing_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("interrupted")
        return original_step(*args, **kwargs)

    ref = _direct(tiny_pipe)
    sched.step = failing_step
    with pytest.raises(RuntimeError, match="interrupted"):
        _direct(tiny_pipe)
    sched.step = original_step
    assert torch.equal(_direct(tiny_pipe), ref)
    assert [(r.step, r.branch) for r in state_of(tiny_pipe).records] == [(0, 0), (1, 0), (2, 0), (3, 0)]
    # Called outside a pipeline call, the transformer has no step: a clear error, not a guess.
    state_of(tiny_pipe).reset()
    with pytest.raises(PlanMismatch, match="outside a sampling trajectory"), torch.no_grad():
        tiny_pipe.transformer(torch.randn(1, 1, 8, 8), timestep=torch.tensor([1]),
                              class_labels=torch.tensor([0]))
    # A scheduler swapped in after apply is followed; the old one is left unwrapped.
    tiny_pipe.scheduler = type(sched).from_config(sched.config)
    assert torch.equal(_direct(tiny_pipe), ref)
    assert "step" not in vars(sched) and "step" in vars(tiny_pipe.scheduler)
    remove(tiny_pipe)
    assert "step" not in vars(tiny_pipe.scheduler) and "set_timesteps" not in vars(tiny_pipe.scheduler)


def test_branches_of_a_step_called_one_by_one_share_the_step(tiny_pipe):
    """Pipelines that call the transformer once per guidance branch (Wan, Flux true CFG): both
    calls of a step are that step, each branch keeps its own cache."""
    apply(tiny_pipe, _plan(REUSE), collapse=False)
    tf, sched = tiny_pipe.transformer, tiny_pipe.scheduler
    sched.set_timesteps(T)
    x = torch.randn(1, 1, 8, 8)
    outs, handle = _module_outputs(tiny_pipe)
    with torch.no_grad():
        for t in sched.timesteps:
            for label in (0, 4):  # conditional, then the null class
                eps = tf(x, timestep=t[None], class_labels=torch.tensor([label])).sample
            sched.step(eps, t, x)
    handle.remove()
    recs = state_of(tiny_pipe).records
    assert [(r.step, r.branch) for r in recs] == [(s, b) for s in range(T) for b in (0, 1)]
    # the MLP reused at step 1 gives each branch its own step-0 output
    assert torch.equal(outs[2], outs[0]) and torch.equal(outs[3], outs[1])
    assert not torch.equal(outs[0], outs[1])


def _flux_inputs():
    from tests.archs import flux

    pipe, _ = flux()
    tf = pipe.transformer
    torch.manual_seed(1)
    b, txt, img, dim = 2, 6, 16, 16
    ids = torch.cat([torch.zeros(txt, 3), torch.stack(torch.meshgrid(
        torch.zeros(1), torch.arange(4.0), torch.arange(4.0), indexing="ij"), -1).reshape(-1, 3)])
    with torch.no_grad():
        rope = tf.pos_embed(ids)
    return tf, torch.randn(b, img, dim), torch.randn(b, txt, dim), rope


def test_partial_flux_attention_matches_full_attention_at_selected_tokens():
    from ditaccel.runtime.hooks import partial_flux_attention
    from ditaccel.tokens import gather_tokens as _gather

    tf, x, ctx, rope = _flux_inputs()
    idx = torch.tensor([[0, 5, 9, 15], [2, 3, 4, 11]])
    with torch.no_grad():
        attn = tf.transformer_blocks[0].attn  # double-stream: [text; image], image queries gathered
        full_img, full_txt = attn(hidden_states=x, encoder_hidden_states=ctx, image_rotary_emb=rope)
        img, txt = partial_flux_attention(attn, x, idx, ctx, rope)
        torch.testing.assert_close(img, _gather(full_img, idx), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(txt, full_txt, atol=1e-5, rtol=1e-5)
        attn = tf.single_transformer_blocks[0].attn  # single-stream: one [text; image] sequence
        both = torch.cat([ctx, x], dim=1)
        rows = torch.cat([torch.arange(6).expand(2, 6), idx + 6], dim=1)
        full = attn(hidden_states=both, image_rotary_emb=rope)
        part = partial_flux_attention(attn, both, rows, None, rope)
        torch.testing.assert_close(part, _gather(full, rows), atol=1e-5, rtol=1e-5)
        # without gathering the positions the answer is wrong: the test can fail
        wrong = partial_flux_attention(attn, both, rows, None, (rope[0][:22].roll(3, 0), rope[1][:22].roll(3, 0)))
        assert not torch.allclose(wrong, _gather(full, rows), atol=1e-3)


def test_partial_wan_attention_matches_full_attention_at_selected_tokens():
    from ditaccel.runtime.hooks import partial_wan_attention
    from ditaccel.tokens import gather_tokens as _gather
    from tests.archs import wan

    pipe, _ = wan()
    tf = pipe.transformer
    torch.manual_seed(1)
    latents = torch.randn(2, 4, 2, 4, 4)  # (B, C, frames, H, W) -> 2 x 2 x 2 = 8 tokens
    with torch.no_grad():
        rope = tf.rope(latents)
        attn = tf.blocks[0].attn1
        x = torch.randn(2, 8, 24)
        idx = torch.tensor([[1, 2, 6], [0, 4, 7]])
        full = attn(x, None, None, rope)
        part = partial_wan_attention(attn, x, idx, rope)
    torch.testing.assert_close(part, _gather(full, idx), atol=1e-5, rtol=1e-5)


def test_routed_block_runs_on_the_chosen_tokens_and_others_skip_it(tiny_pipe):
    """The Shiva operation on a hand-checkable case: block 1 at step 1 runs on the k tokens with
    the highest router score; the others leave it unchanged."""
    k = 6
    route = torch.full((T, LAYERS), FULL)
    route[1, 1] = k
    plan = Plan(num_tokens=N, modules=("attn", "mlp"), anchors=[True] * T,
                tokens=torch.full((T, LAYERS, 2), FULL), route=route)
    with pytest.raises(PlanMismatch, match="pass the router"):
        apply(tiny_pipe, plan)
    seen = []

    def router(x, call):
        seen.append((call.layer, call.step, call.cfg_paired, sorted(call.block_kwargs)))
        return x[..., 0].float()  # the first feature: easy to check

    apply(tiny_pipe, plan, router=router)
    block = tiny_pipe.transformer.transformer_blocks[1]
    io = []
    handle = block.register_forward_hook(lambda m, a, kw, o: io.append((kw.get("hidden_states", a[0] if a else None),
                                                                         o)), with_kwargs=True)
    calls = []
    h2 = block.register_forward_pre_hook(lambda m, a, kw: calls.append((a, dict(kw))), with_kwargs=True)
    _direct(tiny_pipe)
    handle.remove(), h2.remove()
    assert [s[:3] for s in seen] == [(1, 1, True)]  # batched CFG: [x; x] halves detected
    assert "timestep" in seen[0][3] and "class_labels" in seen[0][3]
    x, out = io[1]
    assert out.shape == x.shape
    score = x[..., 0]
    half = score.shape[0] // 2
    paired = score[:half].maximum(score[half:]).repeat(2, 1)
    chosen = torch.zeros_like(score, dtype=torch.bool).scatter(1, paired.topk(k, dim=1).indices, True)
    assert torch.equal(out[~chosen], x[~chosen])  # skipped tokens: the identity path
    # chosen tokens: the block applied to the gathered chosen tokens only
    args, kw = calls[1]
    remove(tiny_pipe)
    sel = x[chosen].view(x.shape[0], k, -1)
    with torch.no_grad():
        ref = block(sel, *args[1:], **{n: v for n, v in kw.items() if n != "hidden_states"})
    torch.testing.assert_close(out[chosen].view_as(ref), ref, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(ref, block(x, *args[1:], **{n: v for n, v in kw.items()
                                                          if n != "hidden_states"})[chosen].view_as(ref))


def _later_steps(attn, mlp):
    tokens = torch.full((T, LAYERS, 2), FULL)
    tokens[1:, :, 0], tokens[1:, :, 1] = attn, mlp
    return Plan(num_tokens=N, modules=("attn", "mlp"), anchors=[True, False, False, False], tokens=tokens,
                token_score="delta")


@pytest.mark.parametrize("mlp", [REUSE, 4])  # the MLP reused, or 4 of its tokens recomputed
def test_batched_conditioning_gives_the_same_images(tiny_pipe, mlp):
    plan = _later_steps(REUSE, mlp)
    apply(tiny_pipe, plan, batch_conditioning=False, collapse=False)
    ref = _direct(tiny_pipe)
    assert not state_of(tiny_pipe).conditioning
    apply(tiny_pipe, plan, collapse=False)
    # the same values (a batched matmul may round differently in the last bit: not bit-identical
    # on this tiny fp32 model; on the bundled one it is, see benchmarks)
    torch.testing.assert_close(_direct(tiny_pipe), ref, atol=1e-5, rtol=0)
    tables = state_of(tiny_pipe).conditioning
    assert sorted(tables) == [(0, 0), (1, 0)]  # both blocks, one batched CFG branch
    assert all(sorted(t.index) == [1, 2, 3] for t in tables.values())


def _shifted(pipe, change):
    """A forward pre-hook changing the transformer call's keyword arguments: ``change(i, kwargs)``."""
    calls = []

    def pre(module, args, kwargs):
        calls.append(None)
        return args, change(len(calls) - 1, dict(kwargs))

    return pipe.transformer.register_forward_pre_hook(pre, with_kwargs=True)


@pytest.mark.parametrize("case", ["timesteps", "labels"])
def test_conditioning_the_table_cannot_predict_is_computed_as_usual(tiny_pipe, case):
    """A pipeline passing timesteps other than its scheduler's gets no table; class labels that
    change after the table was built are conditioned step by step from there."""
    def change(i, kwargs):
        if case == "timesteps":
            kwargs["timestep"] = kwargs["timestep"] + 1
        elif i % T >= 2:  # steps 2 and 3 of each run (one call per step: batched CFG)
            kwargs["class_labels"] = kwargs["class_labels"].flip(0)
        return kwargs

    plan = _later_steps(REUSE, REUSE)
    apply(tiny_pipe, plan, collapse=False)
    plain = _direct(tiny_pipe)
    handle = _shifted(tiny_pipe, change)
    try:
        apply(tiny_pipe, plan, batch_conditioning=False, collapse=False)
        ref = _direct(tiny_pipe)
        apply(tiny_pipe, plan, collapse=False)
        torch.testing.assert_close(_direct(tiny_pipe), ref, atol=1e-5, rtol=0)
        tables = list(state_of(tiny_pipe).conditioning.values())
    finally:
        handle.remove()
    assert not torch.equal(ref, plain)  # the change matters
    if case == "timesteps":
        assert tables and all(t is None for t in tables)
    else:
        assert tables and all(t is not None for t in tables)


@pytest.mark.parametrize("batch_conditioning", [False, True])
def test_norms_feeding_reused_modules_run_on_one_token(tiny_pipe, batch_conditioning):
    apply(tiny_pipe, _plan(REUSE), batch_conditioning=batch_conditioning, collapse=False)
    block = tiny_pipe.transformer.transformer_blocks[0]
    seen = {"norm1": [], "norm3": []}
    hooks = [block.norm1.norm.register_forward_pre_hook(lambda m, a: seen["norm1"].append(a[0].shape[:2])),
             block.norm3.register_forward_hook(lambda m, a, o: seen["norm3"].append(o.shape[:2]))]
    _direct(tiny_pipe)
    for h in hooks:
        h.remove()
    rows = seen["norm1"][0][0]
    assert seen["norm3"] == [(rows, N), (rows, 1), (rows, N), (rows, 1)]
    if batch_conditioning:  # steps 1 and 3 (both reuse attention) conditioned at step 1, at once
        assert seen["norm1"] == [(rows, N), (2 * rows, 1), (rows, N)]
    else:
        assert seen["norm1"] == [(rows, N), (rows, 1), (rows, N), (rows, 1)]


def test_a_pipeline_starting_part_way_runs_the_plans_later_steps(tiny_pipe):
    """Image-to-image pipelines call set_begin_index after set_timesteps: the step index is the
    position in the schedule, and the first step run computes in full (nothing is cached)."""
    from diffusers import DPMSolverMultistepScheduler

    tiny_pipe.scheduler = DPMSolverMultistepScheduler.from_config(tiny_pipe.scheduler.config)
    apply(tiny_pipe, _plan(REUSE, anchors=(True, True, False, False)))
    tf, sched = tiny_pipe.transformer, tiny_pipe.scheduler
    sched.set_timesteps(T)
    sched.set_begin_index(2)
    x = torch.randn(1, 1, 8, 8)
    with torch.no_grad():
        for t in sched.timesteps[2:]:
            sched.step(tf(x, timestep=t[None], class_labels=torch.tensor([0])).sample, t, x)
    recs = state_of(tiny_pipe).records
    assert [r.step for r in recs] == [2, 3]
    assert recs[0].computed[(0, "mlp")] == N and recs[1].computed[(0, "mlp")] == 0


def test_flux_single_blocks_recompute_all_text_tokens_and_k_image_tokens():
    from ditaccel.methods import make_plan, model_shape
    from tests.archs import flux

    pipe, call = flux()
    pipe.set_progress_bar_config(disable=True)
    plan = make_plan("toca", model_shape(pipe.transformer, 4, num_tokens=16), interval=2, ratio=0.5)
    apply(pipe, plan)
    outs = []
    mlp = pipe.transformer.single_transformer_blocks[0].proj_mlp  # sees [6 text; 16 image] tokens
    handle = mlp.register_forward_hook(lambda m, a, o: outs.append(o.detach().clone()))
    call(pipe, 2, 0, 4)
    handle.remove()
    assert len(outs) == 8  # 4 steps x (cond, uncond)
    changed = (outs[2] != outs[0]).any(-1)  # step 1 vs step 0, conditional branch
    assert changed[:, :6].all()  # text tokens: always computed
    assert changed[:, 6:].sum(1).tolist() == [8, 8]  # image tokens: k = 8 of 16
    assert state_of(pipe).records[2].computed[(2, "mlp")] == 8  # layer 2 = first single block


@pytest.mark.parametrize("fill", [REUSE, 5])
def test_caches_survive_a_block_that_modifies_module_outputs_in_place(tiny_pipe, fill):
    """Caches hold module outputs by reference; a consumer that changes them in place must not
    change what later steps reuse: the runtime notices (the module recomputes that once) and
    keeps private copies from then on, so later runs execute the plan exactly."""
    mod = tiny_pipe.transformer.transformer_blocks[0].ff
    apply(tiny_pipe, _plan(fill, anchors=(True, False, False, False)))
    handle = mod.register_forward_hook(lambda m, i, o: o * 2)  # functional: the reference
    expected = _run(tiny_pipe)
    handle.remove()
    handle = mod.register_forward_hook(lambda m, i, o: o.mul_(2))  # the same, in place
    _run(tiny_pipe)
    cache = state_of(tiny_pipe).caches[(0, 0, "mlp")]
    assert cache.copy_out
    got = _run(tiny_pipe)
    handle.remove()
    remove(tiny_pipe)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_plans_run_under_inference_mode(tiny_pipe):
    apply(tiny_pipe, _plan(5))
    ref = _run(tiny_pipe)
    with torch.inference_mode():
        got = _run(tiny_pipe)
    remove(tiny_pipe)
    assert torch.equal(got, ref)


def _forecast_plan(fill, anchors=(True, True, False, False)):
    import dataclasses

    return dataclasses.replace(_plan(fill, anchors), forecast=1)


def test_forecast_extrapolates_the_last_two_full_outputs(tiny_pipe):
    apply(tiny_pipe, _forecast_plan(REUSE), collapse=False)
    outs, handle = _module_outputs(tiny_pipe)
    _run(tiny_pipe)
    handle.remove()
    y0, y1 = outs[0].float(), outs[1].float()
    torch.testing.assert_close(outs[2].float(), y1 + (y1 - y0), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outs[3].float(), y1 + 2 * (y1 - y0), atol=1e-5, rtol=1e-5)
    # uneven gaps are measured in steps; with one full output so far it is plain reuse
    apply(tiny_pipe, _forecast_plan(REUSE, anchors=(True, False, True, False)), collapse=False)
    outs, handle = _module_outputs(tiny_pipe)
    _run(tiny_pipe)
    handle.remove()
    assert torch.equal(outs[1], outs[0])
    torch.testing.assert_close(outs[3], outs[2] + 0.5 * (outs[2] - outs[0]), atol=1e-5, rtol=1e-5)
    remove(tiny_pipe)


def test_forecast_with_partial_recompute_puts_fresh_tokens_over_the_forecast(tiny_pipe):
    k = 5
    apply(tiny_pipe, _forecast_plan(k))
    outs, handle = _module_outputs(tiny_pipe)
    inputs = []
    mod = tiny_pipe.transformer.transformer_blocks[0].ff
    h2 = mod.register_forward_pre_hook(lambda m, a: inputs.append(a[0].detach().clone()))
    _run(tiny_pipe)
    handle.remove(), h2.remove()
    remove(tiny_pipe)
    forecast = outs[1] + (outs[1] - outs[0])
    fresh = ~torch.isclose(outs[2], forecast, atol=1e-5, rtol=1e-5).all(-1)  # (B, N)
    assert fresh.sum(1).tolist() == [k] * fresh.shape[0]
    with torch.no_grad():
        full = mod(inputs[2])
    torch.testing.assert_close(outs[2][fresh], full[fresh], atol=1e-5, rtol=1e-5)
    # the cache keeps full outputs only: step 3 forecasts from steps 0 and 1 again
    forecast3 = outs[1] + 2 * (outs[1] - outs[0])
    stale = torch.isclose(outs[3], forecast3, atol=1e-5, rtol=1e-5).all(-1)
    assert stale.sum(1).tolist() == [N - k] * stale.shape[0]


@pytest.mark.parametrize("fill", [REUSE, 5])
def test_forecast_is_the_same_with_private_copies(tiny_pipe, fill):
    """Under inference mode (and after a consumer modified a cached output in place) caches keep
    private copies and recycle their buffers; the forecast must not read a recycled buffer."""
    apply(tiny_pipe, _forecast_plan(fill, anchors=(True, True, True, False)))
    ref = _run(tiny_pipe)
    with torch.inference_mode():
        got = _run(tiny_pipe)
        assert state_of(tiny_pipe).caches[(0, 0, "mlp")].copy_out
        again = _run(tiny_pipe)
    remove(tiny_pipe)
    assert torch.equal(got, ref) and torch.equal(again, ref)
