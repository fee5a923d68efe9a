import pytest

from ditaccel.methods import ModelShape, delta_dit, fora, toca
from ditaccel.plan import FULL, REUSE

SHAPE = ModelShape(num_steps=10, num_layers=4, num_tokens=20)


def test_fora_anchors_every_interval_and_reuses_between():
    p = fora.plan(fora.Config(interval=3), SHAPE)
    assert p.anchors.nonzero().flatten().tolist() == [0, 3, 6, 9]
    assert (p.tokens[~p.anchors] == REUSE).all() and (p.tokens[p.anchors] == FULL).all()
    assert fora.plan(fora.Config(interval=1), SHAPE).anchors.all()
    assert p.forecast == 0
    f = fora.plan(fora.Config(interval=3, forecast=1), SHAPE)
    assert f.forecast == 1 and f.meta["config"]["forecast"] == 1 and f.tag() != p.tag()


def test_toca_recomputes_a_fixed_fraction():
    p = toca.plan(toca.Config(interval=2, ratio=0.25, token_score="feature_mean"), SHAPE)
    assert p.anchors.nonzero().flatten().tolist() == [0, 2, 4, 6, 8]
    assert (p.tokens[~p.anchors] == 5).all()  # 25% of 20 tokens
    assert p.token_score == "feature_mean"
    frac = p.computed_fraction()
    assert frac[1].eq(0.25).all() and frac[0].eq(1).all()


def test_delta_dit_caches_front_blocks_early_and_rear_blocks_late():
    p = delta_dit.plan(delta_dit.Config(interval=2, cached_blocks=0.5, boundary=0.5), SHAPE)
    early, late = p.tokens[1], p.tokens[7]  # non-anchor steps before / after the boundary
    assert (early[:2] == REUSE).all() and (early[2:] == FULL).all()
    assert (late[:2] == FULL).all() and (late[2:] == REUSE).all()


@pytest.mark.parametrize("make,msg", [
    (lambda: fora.Config(interval=0), "interval must be an integer >= 1"),
    (lambda: toca.Config(ratio=1.0), r"in \[0, 1\)"),
    (lambda: toca.Config(token_score="attn"), "unknown token score"),
    (lambda: delta_dit.Config(cached_blocks=0), r"in \(0, 1\]"),
    (lambda: fora.Config(forecast=2), "forecast must be one of"),
    (lambda: toca.Config(forecast=-1), "forecast must be one of"),
])
def test_bad_configs(make, msg):
    with pytest.raises(ValueError, match=msg):
        make()
