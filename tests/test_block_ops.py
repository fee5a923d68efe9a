"""A partially recomputed or routed block dispatches fewer ops than the same block computed in
full (counted exactly, with ``OpCounter``, per block and step over one trajectory): the tokens it
skips save compute, and its own bookkeeping (scores, one token index per module, the router) costs
less than the conditioning the runtime serves from a per-trajectory table (runtime.embed).  Under
a plan that accelerates any step the table serves full-compute steps too, so after the first step
(which builds it) every block dispatches fewer ops than the plain model's; the images match a run
without the tables."""

import pytest
import torch

from ditaccel.methods import make_plan, model_shape
from ditaccel.metrics import OpCounter
from ditaccel.runtime import apply, remove

T = 6
LAYERS = 6


def _pipe():
    from diffusers import DDIMScheduler, DiTTransformer2DModel

    from ditaccel.models.reference import NOISE_SCHEDULE
    from ditaccel.pipeline import DiTPixelPipeline

    torch.manual_seed(0)
    tf = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=1, out_channels=2,
                               num_layers=LAYERS, sample_size=8, patch_size=2, num_embeds_ada_norm=10,
                               norm_type="ada_norm_zero").eval()
    pipe = DiTPixelPipeline(transformer=tf, scheduler=DDIMScheduler(**NOISE_SCHEDULE))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _block_ops(pipe) -> tuple[torch.Tensor, torch.Tensor]:
    """(steps, layers) ops dispatched inside each block call, and the images."""
    counter, per = OpCounter(), {}
    handles = []
    for i, block in enumerate(pipe.transformer.transformer_blocks):
        handles.append(block.register_forward_pre_hook(lambda m, a, i=i: per.setdefault(i, []).append(-counter.total)))
        handles.append(block.register_forward_hook(lambda m, a, o, i=i: per[i].__setitem__(-1, per[i][-1] + counter.total)))
    try:
        with torch.no_grad(), counter:
            images = pipe(class_labels=[3], guidance_scale=2.0, num_inference_steps=T, output_type="pt",
                          generator=[torch.Generator().manual_seed(0)]).images
    finally:
        for h in handles:
            h.remove()
    return torch.tensor([per[i] for i in range(LAYERS)]).T, torch.as_tensor(images)


def _shiva(pipe):
    from ditaccel.methods.shiva.policy import plan_from_ratios
    from ditaccel.methods.shiva.router import ShivaRouter

    shape = model_shape(pipe.transformer, T)
    plan = plan_from_ratios(torch.full((T, shape.num_layers), 0.5, dtype=torch.float64), shape.num_tokens,
                            shape.modules, multiple=1)
    torch.manual_seed(1)
    return plan, ShivaRouter.for_model(pipe.transformer).eval()


@pytest.mark.parametrize("method", ["toca", "shiva"])
def test_partial_and_routed_blocks_dispatch_fewer_ops_than_full_ones(method):
    pipe = _pipe()
    plain, _ = _block_ops(pipe)
    assert (plain == plain[0, 0]).all()  # every block, every step: the same ops
    if method == "toca":
        plan, router = make_plan("toca", model_shape(pipe.transformer, T), interval=3, ratio=0.5), None
    else:
        plan, router = _shiva(pipe)
    images = {}
    for tables in (True, False):
        apply(pipe, plan, router=router, batch_conditioning=tables)
        try:
            ops, images[tables] = _block_ops(pipe)
        finally:
            remove(pipe)
        if not tables:
            continue
        touched = [s for s in range(T) if not plan.anchors[s] or (plan.route is not None and (plan.route[s] >= 0).any())]
        assert len(touched) > 1 and (method != "toca" or len(touched) < T)  # toca: full steps between
        for s in range(1, T):  # after the first step, which builds the tables for the trajectory
            if s not in touched or method == "toca":  # full compute or part of every block's tokens
                assert (ops[s] < plain[s]).all(), (s, ops[s].tolist(), plain[s].tolist())
            else:  # every routed block but the call's first, which embeds the router's context for all
                routed = (plan.route[s] >= 0).nonzero().flatten().tolist()
                assert all(ops[s, i] < plain[s, i] for i in routed[1:]), (s, ops[s].tolist())
            assert ops[s].sum() < plain[s].sum()
        if method == "toca":  # (six steps of routing at 0.5 do not pay for the router's first call)
            assert ops.sum() < plain.sum()
    torch.testing.assert_close(images[True], images[False], atol=1e-5, rtol=0)


def test_the_tables_serve_only_the_calls_they_were_built_for():
    """Labels that change part way and a timestep off the schedule: those calls compute their own
    conditioning, and the images match a run without the tables."""
    pipe = _pipe()
    plan = make_plan("toca", model_shape(pipe.transformer, T), interval=3, ratio=0.5)
    tf = pipe.transformer
    original = tf.forward
    seen = []

    def shifted(*args, **kwargs):  # step 4: other labels; step 5: a nudged timestep
        step = len(seen)
        seen.append(step)
        if step == 4:
            kwargs["class_labels"] = (kwargs["class_labels"] + 1) % 10
        if step == 5:
            kwargs["timestep"] = kwargs["timestep"] + 1
        return original(*args, **kwargs)

    images = {}
    for tables in (True, False):
        seen.clear()
        tf.forward = shifted
        apply(pipe, plan, batch_conditioning=tables)
        try:
            _, images[tables] = _block_ops(pipe)
        finally:
            remove(pipe)
            tf.forward = original
    assert seen == list(range(T))
    torch.testing.assert_close(images[True], images[False], atol=1e-5, rtol=0)
