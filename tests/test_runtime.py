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
    apply(tiny_pipe, _plan(REUSE))
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
    _, fast = sample(tiny_pipe, [0, 1, 2], steps=T, progress=False)
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

    from ditaccel.runtime.hooks import _gather, partial_joint_attention

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
