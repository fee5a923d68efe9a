"""The shared tester: every runtime guarantee on every supported pipeline architecture."""

import numpy as np
import pytest
import torch

from ditaccel.methods import make_plan, model_shape
from ditaccel.plan import full_plan
from ditaccel.runtime import apply, remove
from tests.archs import ARCHS

STEPS = 4


def _t(x):
    return torch.as_tensor(np.asarray(x)) if not torch.is_tensor(x) else x


@pytest.fixture(params=sorted(ARCHS))
def arch(request):
    pipe, call = ARCHS[request.param]()
    pipe.set_progress_bar_config(disable=True)
    return pipe, lambda batch=2, seed=0: _t(call(pipe, batch, seed, STEPS))


def test_all_anchor_plan_and_remove_are_bit_identical(arch):
    pipe, run = arch
    ref = run()
    shape = model_shape(pipe.transformer, STEPS)
    apply(pipe, full_plan(STEPS, shape.num_layers, shape.num_tokens, shape.modules))
    assert torch.equal(run(), ref)
    apply(pipe, make_plan("toca", shape, interval=2, ratio=0.5))
    fast = run()
    assert not torch.equal(fast, ref)
    assert torch.equal(run(), fast)  # nothing leaks from one call into the next
    remove(pipe)
    assert torch.equal(run(), ref)


@pytest.mark.parametrize("method,opts", [("fora", {"interval": 2}), ("toca", {"interval": 2, "ratio": 0.5}),
                                         ("delta-dit", {"interval": 2})])
def test_a_sample_alone_equals_it_inside_a_batch(arch, method, opts):
    pipe, run = arch
    apply(pipe, make_plan(method, model_shape(pipe.transformer, STEPS), **opts))
    batch = run(batch=3, seed=10)
    alone = run(batch=1, seed=11)  # seed + index: image 1 of the batch
    torch.testing.assert_close(alone[0], batch[1], atol=1e-5, rtol=0)
