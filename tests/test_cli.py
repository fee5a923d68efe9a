import json

import numpy as np
import pytest
import torch
from PIL import Image

from ditaccel.cli.main import main
from ditaccel.viz import save_images


def test_generate_writes_grid_and_stats(tiny_pipe_dir, tmp_path, capsys):
    out, stats, folder = tmp_path / "grid.png", tmp_path / "s.json", tmp_path / "imgs"
    rc = main(["generate", "--model", str(tiny_pipe_dir), "--steps", "3", "--classes", "0,2",
               "--n", "3", "--out", str(out), "--json", str(stats), "--save-dir", str(folder),
               "--dtype", "fp32"])
    assert rc == 0
    info = json.loads(stats.read_text())
    assert info["calls"] == 3 and info["images"] == 6 and info["flops"] > 0 and info["wall_s"] > 0
    with Image.open(out) as im:  # 2 rows x 3 columns of 8x8 with 2px padding, scaled x2
        assert im.size == (2 * (3 * 10 + 2), 2 * (2 * 10 + 2))
    assert sorted(p.name for p in folder.iterdir())[-1] == "00005_c2.png"


@pytest.mark.parametrize("argv,needle", [
    (["--classes", "0,9"], "out of range"),
    (["--classes", "a,b"], "comma-separated integers"),
    (["--n", "0"], "--n: must be an integer >= 1"),
    (["--steps", "0"], "--steps: must be an integer >= 1"),
    (["--out", "grid.jpg"], ".png"),
])
def test_generate_bad_input_is_one_line_exit_2(tiny_pipe_dir, tmp_path, capsys, argv, needle):
    rc = main(["generate", "--model", str(tiny_pipe_dir), "--out", str(tmp_path / "g.png"), *argv])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert needle in err and "\n" not in err and "Traceback" not in err
    assert not (tmp_path / "g.png").exists()


def test_generate_compile_runs_a_plan_as_compiled_programs(tiny_pipe_dir, tmp_path, capsys):
    """``--compile`` with a caching plan (it used to need --shiva): the programs compile in the
    warm-up batch, and the images are the eager run's."""
    base = ["generate", "--model", str(tiny_pipe_dir), "--steps", "4", "--classes", "0,1", "--dtype", "fp32",
            "--method", "fora", "--interval", "2"]
    assert main([*base, "--out", str(tmp_path / "e.png")]) == 0
    assert main([*base, "--compile", "--out", str(tmp_path / "c.png"), "--json", str(tmp_path / "c.json")]) == 0
    assert "compiled in" in capsys.readouterr().out
    with Image.open(tmp_path / "e.png") as a, Image.open(tmp_path / "c.png") as b:
        diff = np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16))
    assert diff.max() <= 1  # (fused kernels round differently; 8-bit images)
    assert json.loads((tmp_path / "c.json").read_text())["plan"].startswith("fora")


def test_generate_unknown_model(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path / "nope")]) == 2
    assert "neither a bundled model" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["generate", "--model", str(tmp_path / "empty")]) == 2
    assert "not a diffusers pipeline folder" in capsys.readouterr().err


def test_metrics_cli(tmp_path, capsys):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 1, 28, 28, generator=g)
    save_images(x, [0, 1, 2, 3], tmp_path / "a")
    save_images(x, [0, 1, 2, 3], tmp_path / "b")
    save_images((x + 0.1).clamp(0, 1), [0, 1, 2, 3], tmp_path / "c")
    assert main(["metrics", "--ref", str(tmp_path / "a"), "--test", str(tmp_path / "b"), "--no-fd",
                 "--json", str(tmp_path / "m.json")]) == 0
    same = json.loads((tmp_path / "m.json").read_text())
    assert same["psnr"] is None and same["ssim"] == pytest.approx(1.0)  # inf, written as null: strict JSON
    assert main(["metrics", "--ref", str(tmp_path / "a"), "--test", str(tmp_path / "c"),
                 "--json", str(tmp_path / "n.json")]) == 0
    diff = json.loads((tmp_path / "n.json").read_text())
    assert 15 < diff["psnr"] < 25 and diff["fd"] > 0
    assert "psnr" in capsys.readouterr().out
    save_images(x[:3], [0, 1, 2], tmp_path / "d")
    assert main(["metrics", "--ref", str(tmp_path / "a"), "--test", str(tmp_path / "d")]) == 2
    assert "different file names" in capsys.readouterr().err


def test_env_lists_versions_and_assets(capsys):
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    for key in ("torch", "diffusers", "torch threads", "bf16 matmul", "model fmnist-dit", "model fmnist-pixart",
                "text encoder"):
        assert key in out


def test_generate_runs_a_diffusers_dit_pipeline_folder(tmp_path):
    """A folder saved by diffusers' DiTPipeline (latent space, VAE, 1000 ImageNet classes: the
    layout of facebook/DiT-XL-2-256) loads and samples through the same command."""
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(0)
    tf = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
                               out_channels=8, num_layers=1, sample_size=4, patch_size=2,
                               num_embeds_ada_norm=1000, norm_type="ada_norm_zero")
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
                        down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4,
                        sample_size=8)
    DiTPipeline(transformer=tf, vae=vae, scheduler=DDIMScheduler()).save_pretrained(tmp_path / "dit")
    stats = tmp_path / "s.json"
    rc = main(["generate", "--model", str(tmp_path / "dit"), "--steps", "2", "--classes", "207,999",
               "--n", "1", "--out", str(tmp_path / "g.png"), "--json", str(stats), "--dtype", "fp32"])
    assert rc == 0
    assert json.loads(stats.read_text())["calls"] == 2
    with Image.open(tmp_path / "g.png") as im:
        assert im.mode == "RGB" and im.size == (2 * (1 * 10 + 2), 2 * (2 * 10 + 2))  # 8x8 RGB, one column


def test_generate_with_a_method_and_compare(tiny_pipe_dir, tmp_path, capsys):
    stats = tmp_path / "s.json"
    rc = main(["generate", "--model", str(tiny_pipe_dir), "--steps", "6", "--classes", "0,1",
               "--n", "2", "--out", str(tmp_path / "g.png"), "--json", str(stats), "--dtype", "fp32",
               "--method", "fora", "--interval", "3", "--compare", "--show-steps"])
    assert rc == 0
    info = json.loads(stats.read_text())
    assert info["method"] == "fora" and 1.5 < info["speedup_flops"] < 3.0
    # (PSNR is a mean over images: inf, written as null, if one of them came out bit-identical)
    assert info["flops_full"] > info["flops"] and 0 < info["ssim"] < 1 and (info["psnr"] or float("inf")) > 5
    assert [r["anchor"] for r in info["per_step"]] == [True, False, False, True, False, False]
    out = capsys.readouterr().out
    assert "vs full model" in out and "anchor" in out
    # the same plan with first-order forecasts: same FLOPs, other images
    assert main(["generate", "--model", str(tiny_pipe_dir), "--steps", "6", "--classes", "0,1", "--n", "2",
                 "--out", str(tmp_path / "f.png"), "--json", str(tmp_path / "f.json"), "--dtype", "fp32",
                 "--method", "fora", "--interval", "3", "--forecast", "1", "--compare"]) == 0
    forecast = json.loads((tmp_path / "f.json").read_text())
    assert forecast["flops"] == info["flops"] and (forecast["forecast"], info["forecast"]) == (1, 0)
    assert forecast["plan"] == "fora-T6-a2-f1"


@pytest.mark.parametrize("argv,needle", [
    (["--method", "fora", "--interval", "0"], "--interval: must be an integer >= 1"),
    (["--method", "fora", "--ratio", "0.2"], "fora has no option ratio"),
    (["--interval", "2"], "--interval needs --method"),
    (["--compare"], "--compare needs --plan, --method or --shiva"),
])
def test_generate_bad_method_options(tiny_pipe_dir, tmp_path, capsys, argv, needle):
    rc = main(["generate", "--model", str(tiny_pipe_dir), "--out", str(tmp_path / "g.png"),
               "--classes", "0,1", *argv])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and needle in err and "\n" not in err


def test_profile_plan_generate_round_trip(tiny_pipe_dir, tmp_path, capsys):
    stem, plan, plots = tmp_path / "prof", tmp_path / "plan.json", tmp_path / "plots"
    assert main(["profile", "--model", str(tiny_pipe_dir), "--steps", "6", "--samples", "4", "--cfg", "2",
                 "--intervals", "1,2", "--ratios", "0.25,0.5", "--dtype", "fp32", "--out", str(stem),
                 "--plot", str(plots)]) == 0
    assert (tmp_path / "prof.json").exists() and (tmp_path / "prof.safetensors").exists()
    assert sorted(p.name for p in plots.iterdir()) == ["best_prune_error.png", "cache_error.png"]
    assert "coefficient of variation" in capsys.readouterr().out
    assert main(["plan", "--profile", str(stem), "--speedup", "1.5", "--calibrate", "0", "--out", str(plan),
                 "--plot", str(tmp_path / "s.png")]) == 0
    out = capsys.readouterr().out
    assert "predicted" in out and "calibrating" not in out and (tmp_path / "s.png").exists()
    assert "calibration" not in json.loads(plan.read_text())["meta"]
    # by default a speedup budget is calibrated, on 16 samples
    default = tmp_path / "default.json"
    assert main(["plan", "--profile", str(stem), "--speedup", "1.5", "--out", str(default)]) == 0
    assert "calibrating on 16 samples" in capsys.readouterr().out
    assert json.loads(default.read_text())["meta"]["calibration"]["samples"] == 16
    # ... a number of anchors is not
    anchors = tmp_path / "anchors.json"
    assert main(["plan", "--profile", str(stem), "--anchors", "3", "--out", str(anchors)]) == 0
    assert "calibration" not in json.loads(anchors.read_text())["meta"]
    calibrated = tmp_path / "cal.json"
    assert main(["plan", "--profile", str(stem), "--speedup", "1.5", "--calibrate", "2",
                 "--out", str(calibrated)]) == 0
    assert "<- kept" in capsys.readouterr().out
    cal = json.loads(calibrated.read_text())["meta"]["calibration"]
    assert cal["samples"] == 2 and cal["rows"][0]["method"] == "soda-cache"
    assert {r["forecast"] for r in cal["rows"]} >= {0, 1}  # both orders measured unless one is given
    fixed = tmp_path / "f1.json"
    assert main(["plan", "--profile", str(stem), "--speedup", "1.5", "--calibrate", "2", "--forecast", "1",
                 "--out", str(fixed)]) == 0
    doc = json.loads(fixed.read_text())
    assert doc["forecast"] == 1 and {r["forecast"] for r in doc["meta"]["calibration"]["rows"]} == {1}
    # both gatings measured unless one is given; --gating fixes it, with or without calibration
    assert {r["gating"] for r in cal["rows"]} == {"now", "cached"}
    gated = tmp_path / "gc.json"
    assert main(["plan", "--profile", str(stem), "--anchors", "3", "--gating", "cached", "--out", str(gated)]) == 0
    assert json.loads(gated.read_text())["gating"] == "cached"
    assert main(["plan", "--profile", str(stem), "--speedup", "1.5", "--calibrate", "2", "--gating", "now",
                 "--out", str(gated)]) == 0
    doc = json.loads(gated.read_text())
    assert "gating" not in doc and {r["gating"] for r in doc["meta"]["calibration"]["rows"]} == {"now"}
    capsys.readouterr()
    # a wall-clock budget with --calibrate is measured: the kept candidate was timed.  (On a profile
    # whose module costs are proportional to their FLOPs: a tiny model's times measured on a loaded
    # machine can price a reusing step above a full one, and then no plan affords 1.05x.)
    from ditaccel.profiling import Profile
    from tests.conftest import timed_like_flops

    timed_like_flops(Profile.load(stem)).save(tmp_path / "priced")
    timed = tmp_path / "lat.json"
    assert main(["plan", "--profile", str(tmp_path / "priced"), "--latency-speedup", "1.05", "--calibrate", "2",
                 "--out", str(timed)]) == 0
    assert "measured speedup" in capsys.readouterr().out
    cal = json.loads(timed.read_text())["meta"]["calibration"]
    assert cal["timed"]["target"] == 1.05 and "speedup_measured" in cal["rows"][cal["chosen"]]
    stats = tmp_path / "g.json"
    assert main(["generate", "--model", str(tiny_pipe_dir), "--steps", "6", "--cfg", "2", "--plan", str(plan),
                 "--compare", "--classes", "0,1", "--n", "1", "--dtype", "fp32", "--out", str(tmp_path / "g.png"),
                 "--json", str(stats)]) == 0
    info = json.loads(stats.read_text())
    assert info["method"] == "soda" and info["speedup_flops"] >= 1.5 * (1 - 1e-9)
    # a plan made for DDIM is refused for another sampler, with the reason
    assert main(["generate", "--model", str(tiny_pipe_dir), "--sampler", "dpm++", "--steps", "6",
                 "--classes", "0,1", "--plan", str(plan), "--out", str(tmp_path / "h.png")]) == 2
    assert "made for the ddim sampler" in capsys.readouterr().err


@pytest.mark.parametrize("argv,needle", [
    (["--profile", "nowhere", "--speedup", "2", "--out", "p.json"], "no profile at"),
    (["--profile", "nowhere", "--speedup", "2", "--out", "p.txt"], ".json"),
    (["--profile", "nowhere", "--speedup", "0.5", "--out", "p.json"], "--speedup: must be a finite number > 1"),
    (["--profile", "nowhere", "--anchors", "3", "--calibrate", "4", "--out", "p.json"], "not --anchors"),
])
def test_plan_bad_input_is_one_line_exit_2(tmp_path, capsys, monkeypatch, argv, needle):
    monkeypatch.chdir(tmp_path)
    assert main(["plan", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "\n" not in err
    assert not (tmp_path / "p.json").exists()


@pytest.mark.parametrize("argv,needle", [
    (["--speedups", "2,x"], "--speedups must be comma-separated numbers"),
    (["--speedups", "0.5"], "must be numbers > 1"),
    (["--calibrate", "-1"], "--calibrate >= 0"),
])
def test_demo_bad_input_is_one_line_exit_2(tmp_path, capsys, monkeypatch, argv, needle):
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--out", str(tmp_path / "d"), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "\n" not in err
    assert not (tmp_path / "d").exists()
