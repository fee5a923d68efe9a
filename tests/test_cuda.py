"""On a CUDA device: the same results as on the CPU (within float tolerance), from the Python API
and the CLI.  Skipped where torch sees no CUDA device; `bash scripts/gpu_check.sh` runs these and
the two-GPU NCCL launch on a GPU machine."""

import json

import pytest
import torch

from ditaccel import io
from ditaccel.cli.main import main
from ditaccel.metrics import psnr
from ditaccel.registry import load_pipeline
from ditaccel.sampling import sample
from tests.conftest import tiny_dit

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

PROFILE = ["--steps", "6", "--samples", "4", "--batch-size", "2", "--cfg", "2", "--intervals", "1,2",
           "--ratios", "0.25,0.5", "--dtype", "fp32"]


@pytest.fixture(autouse=True)
def exact_fp32():
    """fp32 on the GPU as on the CPU (no TF32 in matmuls or convolutions) for the comparisons."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _both(folder):
    return load_pipeline(str(folder), "fp32", "cpu"), load_pipeline(str(folder), "fp32", "cuda")


def test_load_pipeline_places_every_part(tiny_pipe_dir):
    pipe = load_pipeline(str(tiny_pipe_dir), "auto", "cuda")
    assert {p.device.type for p in pipe.transformer.parameters()} == {"cuda"}
    assert pipe.transformer.dtype == torch.bfloat16  # auto on CUDA


def test_sampling_matches_the_cpu_with_and_without_a_plan(tiny_pipe_dir):
    from ditaccel.methods import make_plan, model_shape
    from ditaccel.runtime import apply, remove

    cpu, gpu = _both(tiny_pipe_dir)
    run = dict(steps=6, guidance_scale=2.0, seed=3, batch_size=4, progress=False)
    a, sa = sample(cpu, [0, 1, 2, 3], **run)
    b, sb = sample(gpu, [0, 1, 2, 3], **run)
    assert a.device.type == b.device.type == "cpu"  # images come back to the host
    assert psnr(a, b) > 50 and sa.flops == sb.flops
    for pipe in (cpu, gpu):
        apply(pipe, make_plan("toca", model_shape(pipe.transformer, 6), interval=2, ratio=0.5))
    a, sa = sample(cpu, [0, 1, 2, 3], **run)
    b, sb = sample(gpu, [0, 1, 2, 3], **run)
    assert psnr(a, b) > 40 and sa.flops == sb.flops
    for pipe in (cpu, gpu):
        remove(pipe)


def test_profile_matches_the_cpu(tiny_pipe_dir, tmp_path):
    assert main(["profile", "--model", str(tiny_pipe_dir), *PROFILE, "--device", "cuda", "--out", str(tmp_path / "g")]) == 0
    assert main(["profile", "--model", str(tiny_pipe_dir), *PROFILE, "--device", "cpu", "--out", str(tmp_path / "c")]) == 0
    g, gm = io.load_artifact(tmp_path / "g", "profile")
    c, _ = io.load_artifact(tmp_path / "c", "profile")
    for name in ("e_cache", "e_cache_std", "e_prune", "module_flops"):
        torch.testing.assert_close(g[name], c[name], rtol=1e-3, atol=1e-5, equal_nan=True, msg=name)
    assert gm["step_ms"] > 0 and (g["module_ms"] >= 0).all()


def test_a_profile_interrupted_on_the_gpu_resumes_there(tiny_pipe_dir, tmp_path, monkeypatch):
    """The checkpoint holds the captured transformer call on the CPU; the resumed run's cost
    timing moves it back to the GPU."""
    from ditaccel import profiling

    pipe = load_pipeline(str(tiny_pipe_dir), "fp32", "cuda")
    kw = dict(class_labels=[0, 1, 2, 3, 0], sampler="ddim", steps=6, guidance_scale=2.0, seed=7, batch_size=2,
              intervals=(1, 2), ratios=(0.25, 0.5), timing_repeats=1, progress=False)
    straight = profiling.profile(pipe, **kw)
    real_save = profiling._save_partial

    def save_then_die(*args):
        real_save(*args)
        raise KeyboardInterrupt

    monkeypatch.setattr(profiling, "_save_partial", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        profiling.profile(pipe, checkpoint=tmp_path / "partial", **kw)
    monkeypatch.setattr(profiling, "_save_partial", real_save)
    resumed = profiling.profile(pipe, checkpoint=tmp_path / "partial", **kw)
    for name in ("e_cache", "e_cache_std", "e_prune"):
        torch.testing.assert_close(getattr(resumed, name), getattr(straight, name), equal_nan=True, msg=name)
    assert resumed.step_ms > 0


def test_shiva_training_matches_the_cpu(tmp_path):
    from ditaccel.methods.shiva.train import train_shiva
    from tests.dist_worker import CFG, DATA

    on_gpu = train_shiva(tiny_dit().cuda(), tmp_path / "g", CFG, DATA, progress=False)
    on_cpu = train_shiva(tiny_dit(), tmp_path / "c", CFG, DATA, progress=False)
    (a, ma), (b, mb) = io.load_artifact(on_gpu, "shiva"), io.load_artifact(on_cpu, "shiva")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-3, msg=k)
    for x, y in zip(ma["log"], mb["log"]):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-3)
    # stopped on the GPU, resumed there: the optimizer state is put back on the device
    train_shiva(tiny_dit().cuda(), tmp_path / "r", CFG, DATA, progress=False, stop_after=3)
    resumed = train_shiva(tiny_dit().cuda(), tmp_path / "r", CFG, DATA, progress=False)
    c, _ = io.load_artifact(resumed, "shiva")
    for k in a:
        torch.testing.assert_close(c[k], a[k], rtol=1e-4, atol=1e-5, msg=k)


def test_shiva_artifact_runs_on_the_gpu(tiny_pipe_dir, tmp_path):
    from ditaccel.methods.shiva.inference import apply_shiva, remove_shiva
    from ditaccel.methods.shiva.train import train_shiva
    from tests.dist_worker import CFG, DATA

    pipe = load_pipeline(str(tiny_pipe_dir), "fp32", "cuda")
    stem = train_shiva(tiny_dit(), tmp_path / "s", CFG, DATA, progress=False)  # the saved model's weights
    apply_shiva(pipe, stem, 6)
    images, stats = sample(pipe, [0, 1], steps=6, guidance_scale=2.0, batch_size=2, progress=False)
    remove_shiva(pipe)
    assert torch.isfinite(images).all() and stats.method != "full"


def test_bench_on_the_gpu_times_the_work(tiny_pipe_dir, tmp_path):
    assert main(["bench", "--model", str(tiny_pipe_dir), "--steps", "6", "--cfg", "2", "--n", "4", "--batch-size", "4",
                 "--methods", "fora,soda", "--quick", "--repeats", "1", "--dtype", "fp32", "--device", "cuda",
                 "--profile-samples", "4", "--calibrate", "2", "--cache-dir", str(tmp_path / "cache"),
                 "--out", str(tmp_path / "b")]) == 0
    rows = json.loads((tmp_path / "b" / "bench.json").read_text())["rows"]
    assert {r["method"] for r in rows} >= {"full", "fora", "soda"}
    assert all(r["speedup_measured"] is None or r["speedup_measured"] > 0 for r in rows)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs one GPU per process")
def test_two_gpu_processes_over_nccl_equal_one(tiny_pipe_dir, tmp_path, monkeypatch):
    from tests.test_distributed import launch

    monkeypatch.setenv("DITACCEL_DEVICE", "auto")  # each process on its own GPU, NCCL between them
    launch("profile", "--model", str(tiny_pipe_dir), *PROFILE, "--out", str(tmp_path / "two"))
    assert main(["profile", "--model", str(tiny_pipe_dir), *PROFILE, "--device", "cuda:0", "--out", str(tmp_path / "one")]) == 0
    two, meta = io.load_artifact(tmp_path / "two", "profile")
    one, _ = io.load_artifact(tmp_path / "one", "profile")
    assert meta["processes"] == 2
    for name in ("e_cache", "e_cache_std", "e_prune"):
        torch.testing.assert_close(two[name], one[name], rtol=1e-3, atol=1e-5, equal_nan=True, msg=name)
