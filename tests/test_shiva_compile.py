"""Route plans under torch.compile: the blocks compile once per distinct token count, outputs do
not change, a second generation compiles nothing, and the per-step record stays right."""

import numpy as np
import pytest
import torch

from ditaccel.methods import model_shape
from ditaccel.methods.shiva.policy import plan_from_ratios
from ditaccel.methods.shiva.router import ShivaRouter
from ditaccel.plan import FULL
from ditaccel.runtime import apply, remove, state_of
from ditaccel.runtime.apply import compile_count
from ditaccel.runtime.state import PlanMismatch
from ditaccel.runtime.summary import per_step
from tests.archs import ARCHS

STEPS = 6


class CountingBackend:
    """A torch.compile backend that runs the captured graph as is and counts the graphs."""

    def __init__(self):
        self.graphs = []

    def __call__(self, gm, example_inputs):
        self.graphs.append([tuple(t.shape) for t in example_inputs if torch.is_tensor(t)])
        return gm.forward


def _plan(shape):
    # counts 16 (full), 12, 8, 4 over the steps: four distinct block input shapes
    ratios = torch.ones(STEPS, shape.num_layers, dtype=torch.float64)
    ratios[:, 1:] = torch.tensor([1.0, 0.75, 0.5, 0.25, 0.5, 0.75])[:, None]
    return plan_from_ratios(ratios, shape.num_tokens, shape.modules, multiple=4)


def test_compiled_routing_compiles_once_per_token_count_and_matches_eager():
    torch._dynamo.reset()
    pipe, call = ARCHS["dit-pixel"]()
    pipe.set_progress_bar_config(disable=True)
    shape = model_shape(pipe.transformer, STEPS)
    plan = _plan(shape)
    assert compile_count(plan) == 4
    router = ShivaRouter.for_model(pipe.transformer)
    run = lambda: torch.as_tensor(np.asarray(call(pipe, 2, 0, STEPS)))  # noqa: E731
    with torch.no_grad():
        apply(pipe, plan, router=router)
        eager = run()
        eager_steps = per_step(state_of(pipe))
        backend = CountingBackend()
        apply(pipe, plan, router=router, compile={"backend": backend, "fullgraph": True})
        compiled = run()
        assert len(backend.graphs) == 4, backend.graphs
        assert sorted({g[0][1] for g in backend.graphs}) == [4, 8, 12, 16], "one graph per token count"
        again = run()
        assert len(backend.graphs) == 4, "a second generation compiles nothing"
        compiled_steps = per_step(state_of(pipe))
        remove(pipe)
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
    assert torch.equal(again, compiled)
    # the record of what ran (no module hooks on a pure route plan) says what was routed
    assert [round(r["attn"], 4) for r in compiled_steps] == [round(r["attn"], 4) for r in eager_steps]
    assert compiled_steps[0]["attn"] == 1.0 and compiled_steps[3]["attn"] == pytest.approx((16 + 4) / 32)


def test_block_compilation_refuses_plans_that_cache():
    """(Caching plans compile by steps: tests/test_programs.py.)"""
    from ditaccel.methods import make_plan
    from ditaccel.runtime.program import CompileConfig

    pipe, _ = ARCHS["dit-pixel"]()
    shape = model_shape(pipe.transformer, STEPS)
    with pytest.raises(PlanMismatch, match="only route tokens"):
        apply(pipe, make_plan("fora", shape, interval=2), compile=CompileConfig(scope="blocks"))
    assert state_of(pipe) is None
    route = _plan(shape).route
    assert (route[:, 0] == FULL).all()
