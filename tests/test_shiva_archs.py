"""Shiva's routing on the text-conditioned joint architectures: SD3 joint blocks (text tokens are
never pruned) and Flux (RoPE positions gathered with the kept tokens), checked against the
block's own forward run on the kept tokens, built here independently of the hooks."""

import inspect

import numpy as np
import pytest
import torch

from ditaccel.methods import model_shape
from ditaccel.methods.shiva.policy import plan_from_ratios
from ditaccel.methods.shiva.router import ShivaRouter
from ditaccel.runtime import apply, remove
from ditaccel.runtime.adapters import find_blocks
from tests.archs import ARCHS, TOKENS

STEPS = 3


def even_router(x, call):
    """Keeps the even-numbered image tokens (not a prefix: a position bug shows)."""
    pos = torch.arange(x.shape[1], dtype=torch.float32)
    return ((pos % 2 == 0).float() * 10 - pos * 1e-3).expand(x.shape[0], -1)


@pytest.mark.parametrize("name", ["StableDiffusion3Pipeline", "FluxPipeline"])
def test_routed_joint_blocks_equal_the_block_on_the_kept_tokens(name):
    pipe, call = ARCHS[name]()
    pipe.set_progress_bar_config(disable=True)
    tf = pipe.transformer
    shape = model_shape(tf, STEPS, TOKENS.get(name))
    n = shape.num_tokens
    ratios = torch.full((STEPS, shape.num_layers), 0.5, dtype=torch.float64)
    plan = plan_from_ratios(ratios, n, shape.modules, multiple=1)
    assert int(plan.route[0, 1]) == n // 2
    captured = {}
    handles = []
    for layer, (_, block, spec) in enumerate(find_blocks(tf)):
        sig = inspect.signature(type(block).forward)
        names = [p for p in sig.parameters][1:]

        def pre(mod, args, kwargs, layer=layer, names=names):
            if layer > 0 and layer not in captured:
                captured[layer] = {"in": {**dict(zip(names, args)), **kwargs}}

        def post(mod, args, kwargs, out, layer=layer):
            if layer in captured and "out" not in captured[layer]:
                captured[layer]["out"] = out
        handles += [block.register_forward_pre_hook(pre, with_kwargs=True),
                    block.register_forward_hook(post, with_kwargs=True)]
    with torch.no_grad():
        apply(pipe, plan, router=even_router)
        out = torch.as_tensor(np.asarray(call(pipe, 1, 0, STEPS)))
        remove(pipe)
        for h in handles:
            h.remove()
        assert torch.isfinite(out).all()
        keep = torch.arange(0, n, 2)
        blocks = find_blocks(tf)
        assert len(captured) == len(blocks) - 1
        for layer, rec in captured.items():
            _, block, spec = blocks[layer]
            kw = dict(rec["in"])
            x = kw[spec.image_arg]
            text = kw[spec.text_arg]
            kw[spec.image_arg] = x[:, keep]
            if spec.rope_arg:  # Flux: (text + image, d) positions; the kept image rows after the text
                cos, sin = kw[spec.rope_arg]
                rows = torch.cat([torch.arange(text.shape[1]), text.shape[1] + keep])
                kw[spec.rope_arg] = (cos[rows], sin[rows])
            ref = type(block).forward(block, **kw)  # the block's own forward, no hooks
            got = rec["out"]
            img_ref, img = ref[spec.image_output], got[spec.image_output]
            torch.testing.assert_close(img[:, keep], img_ref, atol=1e-5, rtol=1e-5)
            odd = torch.arange(1, n, 2)
            assert torch.equal(img[:, odd], x[:, odd]), "skipped tokens pass the block unchanged"
            txt_ref, txt = ref[1 - spec.image_output], got[1 - spec.image_output]
            if txt_ref is None:  # SD3's last block computes no text output
                assert txt is None
            else:
                assert txt.shape[1] == text.shape[1], "every text token is computed"
                torch.testing.assert_close(txt, txt_ref, atol=1e-5, rtol=1e-5)
                assert not torch.allclose(txt, text), "the text stream was updated by the block"


@pytest.mark.parametrize("name", ["StableDiffusion3Pipeline", "FluxPipeline"])
def test_shiva_router_drives_joint_models_and_the_plan_comes_off(name):
    pipe, call = ARCHS[name]()
    pipe.set_progress_bar_config(disable=True)
    shape = model_shape(pipe.transformer, STEPS, TOKENS.get(name))
    ratios = torch.full((STEPS, shape.num_layers), 0.5, dtype=torch.float64)
    plan = plan_from_ratios(ratios, shape.num_tokens, shape.modules, multiple=1)
    run = lambda: torch.as_tensor(np.asarray(call(pipe, 2, 0, STEPS)))  # noqa: E731
    with torch.no_grad():
        ref = run()
        apply(pipe, plan, router=ShivaRouter.for_model(pipe.transformer))
        routed = run()
        remove(pipe)
        assert not torch.allclose(routed, ref) and torch.isfinite(routed).all()
        assert torch.equal(run(), ref)
