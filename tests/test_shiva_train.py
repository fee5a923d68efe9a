"""Shiva training, its artifact and inference: what a bug would break."""

import json

import pytest
import torch

from ditaccel import io
from ditaccel.methods.shiva.inference import apply_shiva, load_shiva, remove_shiva, shiva_plan
from ditaccel.methods.shiva.train import ShivaTrainConfig, ShivaTrainer, stratified_timesteps, group_ratios, train_shiva
from ditaccel.plan import FULL
from tests.conftest import tiny_dit

DATA = (torch.rand(64, 1, 8, 8, generator=torch.Generator().manual_seed(3)) * 2 - 1, torch.arange(64) % 4)
CFG = ShivaTrainConfig(keep=0.5, warmup_steps=2, policy_steps=2, joint_steps=2, batch_size=8, distill_every=1,
                       multiple=4, ckpt_every=1, lr_policy=0.05, lr_adapter=1e-2)


def _tensors(stem):
    return io.load_artifact(stem, "shiva")[0]


def test_resumed_training_equals_an_uninterrupted_run(tmp_path):
    straight = train_shiva(tiny_dit(), tmp_path / "a", CFG, DATA, progress=False)
    assert train_shiva(tiny_dit(), tmp_path / "b", CFG, DATA, progress=False, stop_after=3).name == "checkpoint"
    assert not (tmp_path / "b" / "shiva.json").exists()
    resumed = train_shiva(tiny_dit(), tmp_path / "b", CFG, DATA, progress=False)
    a, b = _tensors(straight), _tensors(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # a run with another seed is not the same: the comparison above can fail
    other = train_shiva(tiny_dit(), tmp_path / "c", ShivaTrainConfig(**{**CFG.__dict__, "seed": 1}), DATA, progress=False)
    assert not torch.equal(_tensors(other)["router.proj_x.0.weight"], a["router.proj_x.0.weight"])


def test_exported_steps_are_the_run_at_those_steps_across_a_resume(tmp_path):
    train_shiva(tiny_dit(), tmp_path, CFG, DATA, progress=False, stop_after=3, export_every=2)
    final = train_shiva(tiny_dit(), tmp_path, CFG, DATA, progress=False, export_every=2)
    steps = sorted(p.name for p in (tmp_path / "steps").glob("*.json"))
    assert steps == ["shiva-000002.json", "shiva-000004.json", "shiva-000006.json"]
    last, a = _tensors(tmp_path / "steps" / "shiva-000006"), _tensors(final)
    assert all(torch.equal(last[k], a[k]) for k in a), "the last export is the final artifact"
    # an export is the run stopped there: a run of 4 steps (the same batches) ends where step 4 was
    short = train_shiva(tiny_dit(), tmp_path / "short", CFG, DATA, progress=False, stop_after=4)
    four = _tensors(tmp_path / "steps" / "shiva-000004")
    ckpt = io.load_artifact(short, "shiva-checkpoint")[0]
    assert all(torch.equal(four[k], ckpt[k]) for k in four if k.startswith(("router.", "policy.")))
    assert not torch.equal(four["router.proj_x.0.weight"], a["router.proj_x.0.weight"])
    assert io.load_artifact(tmp_path / "steps" / "shiva-000004", "shiva")[1]["log"][-1]["step"] == 4
    with pytest.raises(ValueError, match="export_every"):
        train_shiva(tiny_dit(), tmp_path / "bad", CFG, DATA, progress=False, export_every=0)


def test_each_stage_trains_what_it_should(tmp_path):
    tr = ShivaTrainer(tiny_dit(), CFG, DATA)
    from ditaccel.methods.shiva.routing import TrainRouting

    def snap():
        return ({k: v.clone() for k, v in tr.router.state_dict().items()},
                {k: v.clone() for k, v in tr.policy.state_dict().items()},
                [p.detach().clone() for p in tr.adapter_params])

    def changed(before, after):
        return any(not torch.equal(before[k], after[k]) for k in before) if isinstance(before, dict) else \
            any(not torch.equal(x, y) for x, y in zip(before, after))

    with TrainRouting(tr.transformer, tr.router, multiple=CFG.multiple) as routing:
        tr.routing = routing
        seen = []
        for stage in (1, 2, 3):
            before = snap()
            for _ in range(2):
                assert tr.train_step()["stage"] == stage
            after = snap()
            seen.append(tuple(changed(b, a) for b, a in zip(before, after)))
    tr.close()
    assert seen == [(True, False, False), (True, True, False), (True, True, True)], seen


def test_fixed_ratio_ablation_keeps_the_policy_at_the_target(tmp_path):
    cfg = ShivaTrainConfig(**{**CFG.__dict__, "adaptive": False})
    stem = train_shiva(tiny_dit(), tmp_path, cfg, DATA, progress=False)
    table = _tensors(stem)["ratio_table"]
    assert torch.allclose(table[:, 1:], torch.full_like(table[:, 1:], 0.5), atol=1e-6) and (table[:, 0] == 1).all()


def test_stratified_timesteps_and_ratio_groups():
    g = torch.Generator().manual_seed(0)
    t = stratified_timesteps(8, 1000, g)
    assert sorted((t // 125).tolist()) == list(range(8)), "one timestep per stratum"
    r = group_ratios(CFG, 9, g)
    groups = [r[:3], r[3:6], r[6:]]
    assert all(len(set(x.tolist())) == 1 for x in groups), "one ratio per group"
    lo = max(0.1, CFG.keep - 0.3)
    for i, x in enumerate(groups):  # disjoint sub-ranges, in order
        assert lo + i * 0.2 - 1e-6 <= float(x[0]) < lo + (i + 1) * 0.2 + 1e-6


def test_checkpoint_refuses_other_settings_and_other_models(tmp_path):
    train_shiva(tiny_dit(), tmp_path, CFG, DATA, progress=False, stop_after=1)
    with pytest.raises(ValueError, match="other settings .*keep"):
        train_shiva(tiny_dit(), tmp_path, ShivaTrainConfig(**{**CFG.__dict__, "keep": 0.7}), DATA, progress=False)
    with pytest.raises(io.ArtifactError, match="another model"):
        train_shiva(tiny_dit(seed=5), tmp_path, CFG, DATA, progress=False)
    with pytest.raises(ValueError, match="keep must be in"):
        ShivaTrainConfig(keep=1.0)
    with pytest.raises(ValueError, match="adapter"):
        ShivaTrainConfig(adapter="ia3")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    path = tmp_path_factory.mktemp("shiva")
    tf = tiny_dit()
    tr = ShivaTrainer(tf, CFG, DATA)
    stem = tr.run(path, progress=False)
    tr.close()
    return stem, tr


def test_artifact_applies_to_a_pipeline_and_comes_off_exactly(trained, tiny_pipe):
    from peft.tuners.tuners_utils import BaseTunerLayer

    stem, _ = trained
    run = lambda: tiny_pipe(class_labels=[0, 3], num_inference_steps=4, guidance_scale=2.0,  # noqa: E731
                            generator=torch.Generator().manual_seed(0), output_type="pt").images
    with torch.no_grad():
        ref = run()
        plan = apply_shiva(tiny_pipe, stem, 4)
        out = run()
        remove_shiva(tiny_pipe)
        again = run()
    assert plan.route.shape == (4, 2) and (plan.route[:, 0] == FULL).all()
    assert not torch.equal(out, ref) and torch.isfinite(out).all()
    assert torch.equal(again, ref), "remove_shiva restores the model bit for bit"
    assert not any(isinstance(m, BaseTunerLayer) for m in tiny_pipe.transformer.modules())
    assert "peft_config" not in vars(tiny_pipe.transformer), "peft's config is taken off with the adapters"


def test_an_artifact_trained_in_fp32_applies_to_the_model_in_bf16(trained, tiny_pipe):
    stem, _ = trained
    tiny_pipe.transformer.to(torch.bfloat16)
    assert load_shiva(stem, tiny_pipe.transformer).fingerprint == io.model_fingerprint(tiny_dit())
    try:
        with torch.no_grad():
            apply_shiva(tiny_pipe, stem, 4)
            out = tiny_pipe(class_labels=[0, 3], num_inference_steps=4, guidance_scale=2.0,
                            generator=torch.Generator().manual_seed(0), output_type="pt").images
    finally:
        remove_shiva(tiny_pipe)
    assert torch.isfinite(out).all()
    with pytest.raises(io.ArtifactError, match="another model"):
        load_shiva(stem, tiny_dit(seed=3).to(torch.bfloat16))


def test_a_second_artifact_goes_on_cleanly_after_the_first(trained, tiny_pipe):
    """Applying, removing and re-applying gives the same images, with no peft state carried over
    (peft warns of 'multiple adapters' when its config is left behind)."""
    import warnings

    stem, _ = trained
    run = lambda: tiny_pipe(class_labels=[1, 2], num_inference_steps=4, guidance_scale=2.0,  # noqa: E731
                            generator=torch.Generator().manual_seed(3), output_type="pt").images
    with torch.no_grad():
        apply_shiva(tiny_pipe, stem, 4)
        first = run()
        remove_shiva(tiny_pipe)
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*peft_config.*")
            apply_shiva(tiny_pipe, stem, 4)
        second = run()
        remove_shiva(tiny_pipe)
    assert torch.equal(first, second)


def test_merged_adapters_and_table_equal_the_trained_model(trained):
    """Inference (adapters merged into the weights, counts from the table) computes what the
    trained model computes with its adapters live and the same counts."""
    from ditaccel.methods.shiva.train import set_adapters
    from ditaccel.runtime import apply, remove

    stem, tr = trained
    fresh = tiny_dit()
    art = load_shiva(stem, fresh)
    ts = torch.tensor([900.0, 400.0])
    plan = shiva_plan(art, ts, 16, exact_budget=False)
    expect = tr.policy(ts).detach()
    from ditaccel.methods.shiva.policy import keep_counts

    assert torch.equal(plan.route, keep_counts(expect, 16, CFG.multiple)), "table lookup = the policy"
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    kw = {"timestep": torch.tensor([900.0, 900.0]), "class_labels": torch.tensor([1, 2])}
    one = shiva_plan(art, ts[:1], 16, exact_budget=False)
    with torch.no_grad():
        set_adapters(tr.transformer, True)
        tr.transformer.eval()
        apply(tr.transformer, one, router=tr.router, check_fingerprint=False)
        trained_out = tr.transformer(x, **kw).sample
        remove(tr.transformer)
        from ditaccel.methods.shiva.inference import _merge_adapters, _unmerge_adapters

        _merge_adapters(fresh, art)
        apply(fresh, one, router=art.router, check_fingerprint=False)
        merged_out = fresh(x, **kw).sample
        remove(fresh)
        _unmerge_adapters(fresh)
    torch.testing.assert_close(merged_out, trained_out, atol=1e-5, rtol=1e-4)
    assert _tensors(stem)["adapter.transformer_blocks.1.ff.net.2.lora_B.weight"].abs().sum() > 0, \
        "stage 3 trained the adapters"


def test_artifact_refusals(trained, tmp_path):
    stem, _ = trained
    with pytest.raises(io.ArtifactError, match="another model"):
        load_shiva(stem, tiny_dit(seed=9))
    tensors, meta = io.load_artifact(stem, "shiva")
    bad = tmp_path / "bad"
    io.save_artifact(bad, "shiva", {**tensors, "ratio_table": tensors["ratio_table"] * float("nan")},
                     {k: v for k, v in meta.items() if k not in ("schema_version", "kind", "tensors_sha256")})
    with pytest.raises(io.ArtifactError, match="keep-ratio table"):
        load_shiva(bad, tiny_dit())
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(io.ArtifactError, match="junk.safetensors: file not found"):
        load_shiva(tmp_path / "junk", tiny_dit())
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(io.ArtifactError, match="not a readable safetensors file"):
        load_shiva(tmp_path / "junk", tiny_dit())


def test_cli_generate_with_shiva_and_train_refusal(trained, tiny_pipe_dir, tmp_path, capsys):
    from ditaccel.cli.main import main

    stem, _ = trained
    stats = tmp_path / "s.json"
    assert main(["generate", "--model", str(tiny_pipe_dir), "--steps", "4", "--cfg", "2", "--shiva", str(stem),
                 "--compare", "--classes", "0,1", "--n", "1", "--dtype", "fp32", "--out", str(tmp_path / "g.png"),
                 "--json", str(stats)]) == 0
    doc = json.loads(stats.read_text())
    # (on this 16-wide model the router costs about what routing saves; the speedup is measured elsewhere)
    assert doc["plan"].startswith("shiva") and doc["flops"] != doc["flops_full"] and doc["psnr"] < 100
    assert main(["generate", "--model", str(tiny_pipe_dir), "--shiva", str(stem), "--method", "fora", "--classes", "0",
                 "--out", str(tmp_path / "h.png")]) == 2
    assert "one of --plan, --method or --shiva" in capsys.readouterr().err
    assert main(["train-shiva", "--model", str(tiny_pipe_dir), "--out", str(tmp_path / "t")]) == 2
    assert "28x28x1" in capsys.readouterr().err
    assert main(["train-shiva", "--out", str(tmp_path / "t"), "--stage-steps", "1,2"]) == 2
    assert "three integers" in capsys.readouterr().err


def test_exact_budget_shift_meets_the_mean_and_keeps_the_learned_shape(trained):
    from ditaccel.methods.shiva.inference import budget_shift

    r = torch.tensor([[1.0, 0.9, 0.2], [1.0, 0.7, 0.5], [1.0, 0.3, 0.8]])
    for keep in (0.3, 0.6, 0.95):
        out = budget_shift(r, keep)
        assert float(out[:, 1:].mean()) == pytest.approx(keep, abs=1e-9) and (out[:, 0] == 1).all()
        assert torch.equal(out[:, 1:].flatten().argsort(), r[:, 1:].flatten().argsort()), "order kept"
    stem, _ = trained
    art = load_shiva(stem, tiny_dit())
    ts = torch.linspace(999, 0, 10)
    plan = shiva_plan(art, ts, 16)
    assert plan.meta["keep"] == CFG.keep and 0 < plan.meta["policy_mean_keep"] < 1
    assert float(torch.tensor(plan.meta["ratios"])[:, 1:].mean()) == pytest.approx(CFG.keep, abs=1e-6)
    with pytest.raises(ValueError, match="keep"):
        budget_shift(r, 0.0)
