import json

import pytest
import torch

from ditaccel.plan import FULL, REUSE, Plan, PlanError, full_plan


def _plan(**kw):
    t, layers = 4, 3
    tokens = torch.full((t, layers, 2), FULL)
    tokens[1] = REUSE
    tokens[3, :, 1] = 5
    args = dict(num_tokens=16, modules=("attn", "mlp"), anchors=[True, False, True, False],
                tokens=tokens, method="test", meta={"model": "x"})
    args.update(kw)
    return Plan(**args)


def test_round_trip_through_json(tmp_path):
    p = _plan()
    q = Plan.from_dict(json.loads(p.to_json()))
    assert p == q and q.num_steps == 4 and q.num_layers == 3
    p.save(tmp_path / "p.json")
    assert Plan.load(tmp_path / "p.json") == p
    r = _plan(route=torch.tensor([[FULL] * 3, [FULL] * 3, [FULL] * 3, [FULL, 8, FULL]]),
              tokens=torch.where(torch.arange(4)[:, None, None] == 3, FULL, _plan().tokens))
    assert Plan.from_dict(r.to_dict()) == r and r != p
    f = _plan(forecast=1)
    assert Plan.from_dict(json.loads(f.to_json())) == f and f != p and f.tag().endswith("-f1")
    old = p.to_dict()
    del old["forecast"]  # plans written before forecasting existed load as plain reuse
    assert Plan.from_dict(old) == p
    g = _plan(gating="cached")
    assert Plan.from_dict(json.loads(g.to_json())) == g and g != p and g.tag().endswith("-gc")
    assert "gating" not in p.to_dict()  # plans written before gating was a choice load as "now"


def test_computed_fraction():
    frac = _plan().computed_fraction()
    assert frac[0].eq(1).all() and frac[1].eq(0).all()
    assert frac[3, :, 1].eq(5 / 16).all() and frac[3, :, 0].eq(1).all()


@pytest.mark.parametrize("kw,msg", [
    (dict(anchors=[False, False, True, False]), "step 0 must be an anchor"),
    (dict(anchors=[True, False]), "tokens must have shape"),
    (dict(modules=("attn", "ffn")), "modules must be distinct"),
    (dict(modules=("attn", "attn")), "modules must be distinct"),
    (dict(token_score="attention"), "unknown token_score"),
    (dict(num_tokens=5), "token counts must be"),
    (dict(num_tokens=1), "num_tokens must be"),
    (dict(anchors=[True, False, True, True]), "anchor steps compute every module"),
    (dict(route=torch.full((4, 2), FULL)), "route must have shape"),
    (dict(forecast=2), "forecast must be one of"),
    (dict(forecast=True), "forecast must be one of"),
    (dict(gating="then"), "gating must be one of"),
    (dict(route=torch.full((4, 3), 0)), "routed token counts"),
    (dict(route=torch.tensor([[FULL] * 3, [FULL] * 3, [FULL] * 3, [4] * 3])), "both routes tokens"),
])
def test_invalid_plans_say_what_is_wrong(kw, msg):
    with pytest.raises(PlanError, match=msg):
        _plan(**kw)


def test_bad_documents():
    with pytest.raises(PlanError, match="not a ditaccel plan"):
        Plan.from_dict({"kind": "profile"})
    d = _plan().to_dict()
    d["schema_version"] = 0
    with pytest.raises(PlanError, match="schema version 0"):
        Plan.from_dict(d)
    d = _plan().to_dict()
    del d["tokens"]
    with pytest.raises(PlanError, match="missing the field 'tokens'"):
        Plan.from_dict(d)
    d = _plan().to_dict()
    d["tokens"] = [[1, 2], [3]]
    with pytest.raises(PlanError, match="ragged"):
        Plan.from_dict(d)


def test_full_plan_and_immutability():
    p = full_plan(5, 2, 16)
    assert p.anchors.all() and p.tokens.eq(FULL).all() and p.tag() == "full-T5-a5"
    src = torch.full((5, 2, 2), FULL)
    q = Plan(num_tokens=16, modules=("attn", "mlp"), anchors=torch.ones(5, dtype=torch.bool), tokens=src)
    src[0, 0, 0] = 3  # the plan keeps its own copy
    assert q.tokens[0, 0, 0] == FULL
