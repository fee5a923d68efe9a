"""Shiva's context-aware router and keep-ratio policy: what a bug would break."""

import numpy as np
import pytest
import torch

from ditaccel.methods.shiva.policy import Budget, RatioPolicy, compile_plan, keep_counts
from ditaccel.methods.shiva.router import ShivaRouter, condition_of
from ditaccel.plan import FULL
from ditaccel.runtime import apply, remove, state_of
from ditaccel.runtime.hooks import RouteCall
from tests.archs import ARCHS, TOKENS

STEPS = 3


def _call(layer, t, labels):
    return RouteCall(layer=layer, step=0, num_steps=STEPS, branch=0, block_kwargs={},
                     call_kwargs={"timestep": t, "class_labels": labels}, cfg_paired=False)


def test_router_scores_depend_on_tokens_timestep_condition_and_layer():
    from tests.conftest import tiny_dit

    tf = tiny_dit()
    router = ShivaRouter.for_model(tf)
    assert router.num_layers == 2 and len(router.proj_x) == 1, "one router per pair of adjacent layers"
    x = torch.randn(3, 16, 16, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 4])  # 4: the null class of classifier-free guidance
    base = router(x, _call(1, torch.tensor([500.0] * 3), labels))
    assert base.shape == (3, 16) and torch.isfinite(base).all()
    assert base[0].std() > 0, "scores must tell tokens apart"
    for other in (_call(1, torch.tensor([20.0] * 3), labels), _call(1, torch.tensor([500.0] * 3), labels.flip(0)),
                  _call(0, torch.tensor([500.0] * 3), labels)):
        assert not torch.allclose(router(x, other), base)
    # a scalar timestep is broadcast over the batch
    assert torch.allclose(router(x, _call(1, torch.tensor(500.0), labels)), base)
    with pytest.raises(ValueError, match="class_labels"):
        router(x, RouteCall(1, 0, STEPS, 0, {}, {"timestep": torch.tensor(1.0)}, False))


def test_condition_registry_covers_the_text_models_and_refuses_others():
    for name in ("StableDiffusion3Pipeline", "FluxPipeline", "PixArtAlphaPipeline"):
        pipe, _ = ARCHS[name]()
        cond, size = condition_of(pipe.transformer)
        assert size > 0 and cond.kind in ("vector", "tokens")
    with pytest.raises(ValueError, match="no condition entry for Linear"):
        condition_of(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("name", ["dit-pixel", "StableDiffusion3Pipeline", "FluxPipeline",
                                  "PixArtAlphaPipeline"])
def test_policy_plan_and_router_run_through_the_runtime(name):
    """The compiled plan routes every block but the first; the untrained router drives it on each
    architecture, both CFG halves keep the same tokens, and removing the plan restores the model."""
    from ditaccel.methods import model_shape

    pipe, call = ARCHS[name]()
    pipe.set_progress_bar_config(disable=True)
    shape = model_shape(pipe.transformer, STEPS, TOKENS.get(name))
    run = lambda: torch.as_tensor(np.asarray(call(pipe, 2, 0, STEPS)))  # noqa: E731
    ref = run()
    policy = RatioPolicy(shape.num_layers, target=0.5)
    plan = compile_plan(policy, torch.linspace(999, 0, STEPS), shape.num_tokens, shape.modules, multiple=2)
    assert (plan.route[:, 0] == FULL).all() and (plan.route[:, 1:] != FULL).all()
    router = ShivaRouter.for_model(pipe.transformer)
    seen = []

    def spy(x, c):
        s = router(x, c)
        seen.append((c.cfg_paired, s.shape))
        return s
    with torch.no_grad():
        apply(pipe, plan, router=spy)
        out = run()
        recs = state_of(pipe).records
        remove(pipe)
    assert out.shape == ref.shape and torch.isfinite(out).all() and not torch.equal(out, ref)
    assert len(seen) == STEPS * (shape.num_layers - 1) * (len(recs) // STEPS)
    assert torch.equal(run(), ref)


def test_policy_starts_at_the_target_and_its_table_is_static():
    policy = RatioPolicy(num_layers=4, target=0.6)
    t = torch.tensor([999.0, 500.0, 1.0])
    r = policy(t)
    assert r.shape == (3, 4) and torch.all(r[:, 0] == 1)
    assert torch.allclose(r[:, 1:], torch.full((3, 3), 0.6), atol=1e-6)
    noisy = policy(t, noise_std=1.0, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(noisy[:, 1:], r[:, 1:]) and torch.all(noisy[:, 0] == 1)
    with pytest.raises(ValueError, match="target"):
        RatioPolicy(4, target=1.0)


def test_keep_counts_round_to_the_multiple_and_never_route_the_first_block():
    ratios = torch.tensor([[1.0, 0.6, 0.02, 0.99], [1.0, 0.5, 0.31, 1.0]])
    k = keep_counts(ratios, num_tokens=64, multiple=8)
    assert k.tolist() == [[FULL, 40, 8, FULL], [FULL, 32, 16, FULL]]
    assert keep_counts(ratios, 64, multiple=1).tolist() == [[FULL, 38, 1, 63], [FULL, 32, 20, FULL]]
    with pytest.raises(ValueError, match="multiple"):
        keep_counts(ratios, 64, multiple=0)


def test_budget_loss_pushes_the_mean_ratio_to_the_target():
    policy = RatioPolicy(num_layers=3, target=0.8)
    budget = Budget(target=0.5, beta=0.2)
    opt = torch.optim.SGD(policy.parameters(), lr=2.0)
    t = torch.linspace(1, 999, 16)
    for _ in range(200):
        opt.zero_grad()
        budget.loss(policy(t)).backward()
        opt.step()
    assert policy(t)[:, 1:].mean().item() == pytest.approx(0.5, abs=0.03)
    assert budget.mu == pytest.approx(0.5, abs=0.03)
    again = Budget(0.1)
    again.load_state_dict(budget.state_dict())
    assert again.mu == budget.mu and again.target == 0.5
    again.load_state_dict({**budget.state_dict(), "mu": 0.7})
    ratios = torch.full((2, 3), 0.9)
    ratios[:, 0] = 1.0  # layer 0 is left out of the mean
    assert float(again.loss(ratios)) == pytest.approx(0.9 * 2 * (0.2 * 0.9 + 0.8 * 0.7 - 0.5))


def _settle(budget, pull=0.5, steps=400):
    """A policy whose task loss pulls every ratio up (as the diffusion loss does) against the budget."""
    policy = RatioPolicy(num_layers=3, target=budget.target)
    opt = torch.optim.SGD(policy.parameters(), lr=0.5)
    t = torch.linspace(1, 999, 16)
    for _ in range(steps):
        opt.zero_grad()
        ratios = policy(t)
        (budget.loss(ratios) - pull * ratios[:, 1:].mean()).backward()
        opt.step()
    return budget


def test_the_budget_integral_holds_the_ema_at_the_target_against_a_pull():
    assert _settle(Budget(0.6)).mu > 0.65, "the paper's loss alone settles off the target under a pull"
    held = _settle(Budget(0.6, gain=0.1))
    assert held.mu == pytest.approx(0.6, abs=0.01) and held.integral == pytest.approx(0.5, abs=0.05)
    again = Budget(0.1)
    again.load_state_dict(held.state_dict())
    assert (again.gain, again.integral) == (held.gain, held.integral)
    again.load_state_dict({k: v for k, v in held.state_dict().items() if k not in ("gain", "integral")})
    assert (again.gain, again.integral) == (0.0, 0.0), "a checkpoint from before the integral term"
    with pytest.raises(ValueError, match="gain"):
        Budget(0.5, gain=-1.0)


def _tiny_transformer_call(b=4, seed=0):
    from tests.conftest import tiny_dit

    tf = tiny_dit()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 1, 8, 8, generator=g)
    kwargs = {"timestep": torch.tensor([900.0, 500.0, 300.0, 20.0][:b]), "class_labels": torch.arange(b) % 4}
    return tf, x, kwargs


def test_training_routing_forward_equals_the_inference_runtime_for_the_same_counts():
    from ditaccel.methods.shiva.routing import TrainRouting
    from ditaccel.plan import Plan, full_plan

    tf, x, kw = _tiny_transformer_call()
    router = ShivaRouter.for_model(tf)
    n, layers, k = 16, 2, 8
    base = full_plan(1, layers, n, ("attn", "mlp"))
    route = torch.tensor([[FULL, k]])
    plan = Plan(num_tokens=n, modules=base.modules, anchors=base.anchors, tokens=base.tokens, route=route,
                method="shiva")
    with torch.no_grad():
        full = tf(x, **kw).sample
        apply(tf, plan, router=router)
        inference = tf(x, **kw).sample
        remove(tf)
        with TrainRouting(tf, router, multiple=8) as routing:
            routing.ratios = torch.tensor([[1.0, k / n]] * 4)
            trained = tf(x, **kw).sample
    assert not torch.allclose(inference, full)
    torch.testing.assert_close(trained, inference, atol=1e-5, rtol=1e-5)
    assert torch.equal(tf(x, **kw).sample, full), "leaving the context removes the hooks"


def test_training_routing_gives_each_sample_its_own_count_and_gradients_to_router_and_ratios():
    from ditaccel.methods.shiva.routing import TrainRouting

    tf, x, kw = _tiny_transformer_call()
    router = ShivaRouter.for_model(tf)
    ratios = torch.tensor([[1.0, 0.5], [1.0, 0.25], [1.0, 1.0], [1.0, 0.5]], requires_grad=True)
    with TrainRouting(tf, router, multiple=4) as routing:
        routing.ratios = ratios
        out = tf(x, **kw).sample
        # a sample routed alone gets the same output as inside the mixed batch
        with torch.no_grad():
            routing.ratios = ratios[1:2].detach()
            alone = tf(x[1:2], **{k: v[1:2] for k, v in kw.items()}).sample
    torch.testing.assert_close(alone[0], out[1].detach(), atol=1e-5, rtol=1e-5)
    out.pow(2).mean().backward()
    assert ratios.grad[:, 1].abs().sum() > 0 and ratios.grad[2, 1] == 0, "a sample keeping every token has no k gradient"
    assert all(p.grad is not None for p in router.proj_x.parameters())
    assert router.proj_x[0].weight.grad.abs().sum() > 0
    flux, _ = ARCHS["FluxPipeline"]()
    with pytest.raises(ValueError, match="rotary positions"):
        TrainRouting(flux.transformer, router)
