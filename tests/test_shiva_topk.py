"""The residual-based differentiable top-k: exact forward, gradients that point the right way, and
a budget k that is learned from a wrong start on a task whose best k is known."""

import pytest
import torch
from torch import nn

from ditaccel.methods.shiva.topk import inclusion_probability, residual_topk, soft_rank

N, D, SIGNAL = 64, 16, 20


def _task(seed=0):
    """Tokens carry a marker in feature 0; the target is the block's output for the 20 marked
    tokens and the input for the others, so the best budget is k = 20 with marked tokens first."""
    with torch.random.fork_rng():  # the fixed block, without touching the global generator
        torch.manual_seed(seed)
        net = nn.Sequential(nn.Linear(D, 32), nn.GELU(), nn.Linear(32, D)).requires_grad_(False)
    block = lambda x: x + net(x)  # noqa: E731

    def batch(b=32):
        x = torch.randn(b, N, D)
        marked = torch.zeros(b, N, dtype=torch.bool)
        for i in range(b):
            marked[i, torch.randperm(N)[:SIGNAL]] = True
        x[..., 0] = marked.float() * 2 - 1 + 0.3 * torch.randn(b, N)
        return x, torch.where(marked[..., None], block(x), x)
    return block, batch


def test_soft_rank_orders_and_matches_hard_rank_when_sharp():
    s = torch.tensor([[0.3, 2.0, -1.0, 0.9]])
    assert torch.allclose(soft_rank(s, 1e-3), torch.tensor([[3.0, 1.0, 4.0, 2.0]]), atol=1e-3)
    pi = inclusion_probability(s, 2.5, tau_rank=1e-3, tau_sel=0.01)
    assert (pi[0, [1, 3]] > 0.99).all() and (pi[0, [0, 2]] < 0.01).all()


@pytest.mark.parametrize("estimator", ["residual", "input-scaling", "dual"])
def test_forward_is_hard_top_k(estimator):
    torch.manual_seed(2)
    block, batch = _task()
    x, _ = batch(4)
    scores = torch.randn(4, N, requires_grad=True)
    out = residual_topk(x, scores, 24, block, k_soft=torch.tensor(30.0, requires_grad=True), estimator=estimator)
    idx = scores.topk(24, dim=1).indices
    chosen = torch.zeros(4, N, dtype=torch.bool).scatter(1, idx, True)
    assert torch.allclose(out[chosen], block(x)[chosen], atol=1e-5)
    assert torch.equal(out[~chosen], x[~chosen])


def _grads(estimator, router, logit_k, x, y):
    router.zero_grad()
    logit_k.grad = None
    out = residual_topk(x, router(x).squeeze(-1), int(N * torch.sigmoid(logit_k)), lambda t: block(t),
                        k_soft=N * torch.sigmoid(logit_k), estimator=estimator)
    ((out - y) ** 2).mean().backward()
    return torch.cat([p.grad.flatten() for p in router.parameters()] + [logit_k.grad.flatten()])


block, _batch = _task()


@pytest.mark.parametrize("start", [0.2, 0.6])
def test_residual_estimator_agrees_with_the_exact_surrogate(start):
    torch.manual_seed(3)
    router = nn.Linear(D, 1)
    logit_k = torch.logit(torch.tensor(start)).requires_grad_()
    x, y = _batch()
    exact = _grads("dual", router, logit_k, x, y)
    ours = _grads("residual", router, logit_k, x, y)
    assert exact.abs().sum() > 0 and ours[-1] != 0           # gradients reach the router and k
    assert torch.cosine_similarity(ours, exact, 0) > 0.8      # measured 0.94-0.95


@pytest.mark.parametrize("start", [0.1, 0.7])
def test_budget_is_learned_from_a_wrong_start(start):
    torch.manual_seed(1)
    router = nn.Linear(D, 1)
    logit_k = torch.logit(torch.tensor(start)).requires_grad_()
    opt = torch.optim.Adam([*router.parameters(), logit_k], lr=0.03)
    for _ in range(300):
        x, y = _batch()
        k_soft = N * torch.sigmoid(logit_k)
        out = residual_topk(x, router(x).squeeze(-1), int(k_soft.clamp(1, N)), block, k_soft=k_soft, noise_std=0.1)
        loss = ((out - y) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert abs(N * torch.sigmoid(logit_k).item() - SIGNAL) < 2.5


def test_per_sample_budget_and_bad_input():
    x = torch.randn(3, 8, 4)
    scores = torch.randn(3, 8)
    k_soft = torch.tensor([2.0, 4.0, 6.0], requires_grad=True)
    out = residual_topk(x, scores, 4, lambda t: 2 * t, k_soft=k_soft)
    out.sum().backward()
    assert k_soft.grad.shape == (3,) and (k_soft.grad != 0).all()
    with pytest.raises(ValueError, match="estimator"):
        residual_topk(x, scores, 4, lambda t: t, estimator="ste")
    with pytest.raises(ValueError, match="k must be in 1..8"):
        residual_topk(x, scores, 9, lambda t: t)
    with pytest.raises(ValueError, match="shape"):
        residual_topk(x, scores[:, :5], 4, lambda t: t)
