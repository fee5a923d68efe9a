import pytest
import torch

from ditaccel import io
from ditaccel.models import reference
from ditaccel.models.reference import TrainConfig, build_transformer, train_reference


def test_adaln_zero_init_predicts_zero():
    model = build_transformer().eval()
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        out = model(x, timestep=torch.tensor([10, 500]), class_labels=torch.tensor([1, 10])).sample
    assert out.shape == (2, 1, 28, 28)
    assert torch.count_nonzero(out) == 0
    assert model.pos_embed.height * model.pos_embed.width == 196 and len(model.transformer_blocks) >= 8


def test_lr_schedule_warms_up_then_decays():
    cfg = TrainConfig(steps=100, warmup_steps=10, lr=1e-3, min_lr_ratio=0.1)
    assert reference._lr_at(cfg, 0) == pytest.approx(1e-4)
    assert reference._lr_at(cfg, 9) == pytest.approx(1e-3)
    assert reference._lr_at(cfg, 100) == pytest.approx(1e-4)
    assert reference._lr_at(cfg, 50) < reference._lr_at(cfg, 20)


def test_resume_replays_a_straight_run(tmp_path):
    kw = dict(batch_size=4, warmup_steps=2, ckpt_every=2)
    straight = train_reference(tmp_path / "a", TrainConfig(steps=4, **kw), progress=False)
    train_reference(tmp_path / "b", TrainConfig(steps=2, **kw), progress=False)  # "interrupted"
    resumed = train_reference(tmp_path / "b", TrainConfig(steps=4, **kw), progress=False)
    a, _ = io.load_artifact(tmp_path / "a" / "checkpoint", "reference-checkpoint")
    b, meta = io.load_artifact(tmp_path / "b" / "checkpoint", "reference-checkpoint")
    assert meta["step"] == 4
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    assert (straight / "model_index.json").is_file() and (resumed / "transformer").is_dir()


def test_resume_refuses_other_settings(tmp_path):
    train_reference(tmp_path, TrainConfig(steps=1, batch_size=4, ckpt_every=1), progress=False)
    with pytest.raises(ValueError, match="batch_size=4"):
        train_reference(tmp_path, TrainConfig(steps=2, batch_size=8, ckpt_every=1), progress=False)


def test_bad_config_is_rejected():
    with pytest.raises(ValueError, match="unknown preset"):
        TrainConfig(preset="nope")
    with pytest.raises(ValueError, match="steps must be >= 1"):
        TrainConfig(steps=0)
