"""The shared tester: every runtime guarantee on every supported pipeline architecture."""

import numpy as np
import pytest
import torch

from ditaccel.methods import make_plan, model_shape
from ditaccel.plan import FULL, Plan, full_plan
from ditaccel.runtime import apply, remove, state_of
from tests.archs import ARCHS, TOKENS

STEPS = 4


def _t(x):
    return torch.as_tensor(np.asarray(x)) if not torch.is_tensor(x) else x


@pytest.fixture(params=sorted(ARCHS))
def arch(request):
    pipe, call = ARCHS[request.param]()
    pipe.set_progress_bar_config(disable=True)
    shape = model_shape(pipe.transformer, STEPS, TOKENS.get(request.param))
    return pipe, lambda batch=2, seed=0: _t(call(pipe, batch, seed, STEPS)), shape


def route_plan(shape, keep: float = 0.5) -> Plan:
    """Every step computes; from step 1 on, every block but the first runs on half the tokens."""
    route = torch.full((shape.num_steps, shape.num_layers), FULL)
    route[1:, 1:] = max(1, int(shape.num_tokens * keep))
    base = full_plan(shape.num_steps, shape.num_layers, shape.num_tokens, shape.modules)
    return Plan(num_tokens=base.num_tokens, modules=base.modules, anchors=base.anchors,
                tokens=base.tokens, route=route, method="routed")


def norm_router(x, call):
    """A stand-in router: the token's feature norm (a real one is learned, issue 6)."""
    return x.float().norm(dim=-1) * (1 + call.layer)


PLANS = {"fora": {"interval": 2}, "toca": {"interval": 2, "ratio": 0.5}, "delta-dit": {"interval": 2}}


def test_all_anchor_plan_and_remove_are_bit_identical(arch):
    pipe, run, shape = arch
    ref = run()
    apply(pipe, full_plan(STEPS, shape.num_layers, shape.num_tokens, shape.modules))
    assert torch.equal(run(), ref)
    for method, opts in PLANS.items():
        apply(pipe, make_plan(method, shape, **opts))
        fast = run()
        assert not torch.equal(fast, ref), method
        assert torch.equal(run(), fast), method  # nothing leaks from one call into the next
        # caches are held by reference: no supported block may modify a module output in place
        assert not any(c.copy_out for c in state_of(pipe).caches.values()), method
        assert state_of(pipe).caches, method
    apply(pipe, route_plan(shape), router=norm_router)
    routed = run()
    assert not torch.equal(routed, ref) and torch.equal(run(), routed)
    remove(pipe)
    assert torch.equal(run(), ref)
    # the modules are left as they were: no instance-level forward hiding their class's (a later
    # class patch, such as tomesd's, must take effect)
    left = [n for n, m in pipe.transformer.named_modules()
            if "forward" in m.__dict__ or getattr(getattr(m, "_diffusers_hook", None), "hooks", None)]
    assert not left, left[:3]


@pytest.mark.parametrize("method", [*PLANS, "routed"])
def test_a_sample_alone_equals_it_inside_a_batch(arch, method):
    pipe, run, shape = arch
    if method == "routed":
        apply(pipe, route_plan(shape), router=norm_router)
    else:
        apply(pipe, make_plan(method, shape, **PLANS[method]))
    batch = run(batch=3, seed=10)
    alone = run(batch=1, seed=11)  # seed + index: image 1 of the batch
    torch.testing.assert_close(alone[0], batch[1], atol=1e-5, rtol=0)
    recs = state_of(pipe).records
    assert len({r.step for r in recs}) == STEPS and all(r.branch in (0, 1) for r in recs)


def test_skipping_the_norms_of_reused_modules_changes_nothing(arch):
    pipe, run, shape = arch
    plan = make_plan("toca", shape, interval=3, ratio=0.5)  # steps 1, 2: partial; then reuse:
    tokens = plan.tokens.clone()
    tokens[2] = 0  # step 2 reuses every module
    plan = type(plan)(num_tokens=plan.num_tokens, modules=plan.modules, anchors=plan.anchors,
                      tokens=tokens, token_score=plan.token_score)
    apply(pipe, plan, skip_reused_norms=False)
    ref = run()
    apply(pipe, plan)
    assert torch.equal(run(), ref)
