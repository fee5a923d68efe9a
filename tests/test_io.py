import json

import pytest
import torch

from ditaccel import io


def test_artifact_round_trip_and_integrity(tmp_path):
    t = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.tensor(3)}
    io.save_artifact(tmp_path / "p", "profile", t, {"steps": 50})
    back, meta = io.load_artifact(tmp_path / "p", "profile")
    assert torch.equal(back["a"], t["a"]) and meta["steps"] == 50
    assert meta["schema_version"] == io.SCHEMA_VERSION
    with pytest.raises(io.ArtifactError, match="not a plan artifact"):
        io.load_artifact(tmp_path / "p", "plan")


def test_an_artifact_loaded_changed_and_saved_again_loads(tmp_path):
    """The loaded metadata carries the old digest: saving it back with new tensors must not keep it."""
    io.save_artifact(tmp_path / "p", "profile", {"a": torch.zeros(3)}, {"steps": 50})
    tensors, meta = io.load_artifact(tmp_path / "p", "profile")
    io.save_artifact(tmp_path / "p", "profile", {"a": tensors["a"] + 1}, meta)
    back, meta2 = io.load_artifact(tmp_path / "p", "profile")
    assert torch.equal(back["a"], torch.ones(3)) and meta2["steps"] == 50


def test_mixed_write_detected(tmp_path):
    io.save_artifact(tmp_path / "p", "profile", {"a": torch.zeros(3)}, {})
    io.write_tensors(tmp_path / "p.safetensors", {"a": torch.ones(3)})
    with pytest.raises(io.ArtifactError, match="do not match"):
        io.load_artifact(tmp_path / "p", "profile")


def test_wrong_schema_version_and_garbage(tmp_path):
    io.save_artifact(tmp_path / "p", "profile", {"a": torch.zeros(3)}, {})
    meta = json.loads((tmp_path / "p.json").read_text())
    meta["schema_version"] = 999
    io.write_tensors(tmp_path / "p.safetensors", {"a": torch.zeros(3)}, {io.META_KEY: json.dumps(meta)})
    with pytest.raises(io.ArtifactError, match="schema version 999"):
        io.load_artifact(tmp_path / "p", "profile")
    (tmp_path / "g.json").write_text("{not json")
    with pytest.raises(io.ArtifactError, match="not valid JSON"):
        io.read_json(tmp_path / "g.json")
    (tmp_path / "g.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(io.ArtifactError, match="not a readable safetensors"):
        io.read_tensors(tmp_path / "g.safetensors")


def test_atomic_write_leaves_no_temp_and_keeps_old_on_failure(tmp_path):
    target = tmp_path / "x.json"
    io.write_json(target, {"v": 1})

    class Boom:
        def __repr__(self):
            raise RuntimeError("boom")

    with pytest.raises(TypeError):
        io.write_json(target, {"v": Boom()})
    assert json.loads(target.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_fingerprint_tracks_weights_and_config():
    from tests.conftest import tiny_dit

    a, b = tiny_dit(seed=0), tiny_dit(seed=0)
    assert io.model_fingerprint(a) == io.model_fingerprint(b)
    with torch.no_grad():
        b.proj_out_2.weight.add_(1.0)
    assert io.model_fingerprint(a) != io.model_fingerprint(b)
    assert io.model_fingerprint(a) != io.model_fingerprint(tiny_dit(out_channels=2))


def test_fingerprint_is_the_same_in_every_floating_dtype_and_refuses_other_weights():
    from tests.conftest import tiny_dit

    fp = io.model_fingerprint(tiny_dit(seed=0))
    for dtype in (torch.bfloat16, torch.float16, torch.float64):
        assert io.model_fingerprint(tiny_dit(seed=0).to(dtype)) == fp, dtype
    assert io.model_fingerprint(tiny_dit(seed=1)) != fp
    assert io.model_fingerprint(tiny_dit(seed=1).to(torch.bfloat16)) != fp
    tuned = tiny_dit(seed=0)
    with torch.no_grad():  # a small fine-tune of one layer: other weights, so another model
        g = torch.Generator().manual_seed(0)
        w = tuned.transformer_blocks[1].ff.net[2].weight
        w.add_(torch.randn(w.shape, generator=g) * 0.1 * w.abs().mean())
    assert io.model_fingerprint(tuned) != fp


def test_fingerprint_is_the_same_wherever_the_model_was_saved_or_loaded_from(tmp_path):
    from diffusers import DiTTransformer2DModel

    from tests.conftest import tiny_dit

    a = tiny_dit()
    for name in ("one", "two"):
        a.save_pretrained(tmp_path / name)
    one = DiTTransformer2DModel.from_pretrained(tmp_path / "one")
    two = DiTTransformer2DModel.from_pretrained(tmp_path / "two")
    assert io.model_fingerprint(one) == io.model_fingerprint(two) == io.model_fingerprint(a)
