"""Two CPU processes through accelerate (gloo on loopback) give the single-process results."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ditaccel import io
from ditaccel.cli.main import main

ACCELERATE = Path(sys.executable).with_name("accelerate")


def launch(*argv: str, processes: int = 2, module_prefix: bool = True) -> subprocess.CompletedProcess:
    """``accelerate launch --multi_gpu --num_processes N -m ditaccel ...`` (multi_gpu on a machine
    without CUDA: MULTI_CPU processes over gloo), one thread each."""
    cmd = [str(ACCELERATE), "launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--num_cpu_threads_per_process", "1",
           "--main_process_port", str(29500 + os.getpid() % 1000), "-m", *(["ditaccel"] if module_prefix else []), *argv]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "TQDM_DISABLE": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


PROFILE = ["--steps", "6", "--samples", "5", "--batch-size", "2", "--cfg", "2", "--intervals", "1,2",
           "--ratios", "0.25,0.5", "--dtype", "fp32"]


def test_profile_on_two_processes_equals_one(tiny_pipe_dir, tmp_path):
    launch("profile", "--model", str(tiny_pipe_dir), *PROFILE, "--out", str(tmp_path / "two"))
    assert main(["profile", "--model", str(tiny_pipe_dir), *PROFILE, "--out", str(tmp_path / "one")]) == 0
    two, meta2 = io.load_artifact(tmp_path / "two", "profile")
    one, meta1 = io.load_artifact(tmp_path / "one", "profile")
    assert meta2["processes"] == 2 and meta1["processes"] == 1
    for name in ("e_cache", "e_cache_std", "e_prune", "e_forecast", "module_flops"):
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-6, equal_nan=True, msg=name)
    assert not (tmp_path / "two.partial.safetensors").exists()


def _shiva(stem):
    return io.load_artifact(stem, "shiva")


def test_shiva_training_on_two_processes_equals_one_and_resumes_on_one(tmp_path):
    from ditaccel.methods.shiva.train import train_shiva
    from tests.conftest import tiny_dit
    from tests.dist_worker import CFG, DATA

    assert CFG.score_noise > 0 and CFG.logit_noise > 0  # the noise's split is part of what is compared
    launch("tests.dist_worker", str(tmp_path / "two"), module_prefix=False)
    one = train_shiva(tiny_dit(), tmp_path / "one", CFG, DATA, progress=False)
    (a, meta_a), (b, meta_b) = _shiva(tmp_path / "two" / "shiva"), _shiva(one)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-3, msg=k)  # Adam amplifies float noise on ~0 params
    for x, y in zip(meta_a["log"], meta_b["log"]):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-3) and x["ema_keep"] == pytest.approx(y["ema_keep"], rel=1e-4)
    # stopped after 3 steps on two processes, resumed on one: the same run
    launch("tests.dist_worker", str(tmp_path / "mixed"), "3", module_prefix=False)
    assert (tmp_path / "mixed" / "checkpoint.safetensors").exists() and not (tmp_path / "mixed" / "shiva.json").exists()
    resumed = train_shiva(tiny_dit(), tmp_path / "mixed", CFG, DATA, progress=False)
    c, _ = _shiva(resumed)
    for k in a:
        torch.testing.assert_close(c[k], b[k], rtol=1e-3, atol=1e-3, msg=k)


def test_bench_splits_methods_over_two_processes_and_merges_them(tiny_pipe_dir, tmp_path):
    import json

    argv = ["bench", "--model", str(tiny_pipe_dir), "--steps", "6", "--cfg", "2", "--n", "4", "--batch-size", "4",
            "--methods", "fora,toca,delta-dit", "--quick", "--repeats", "0", "--dtype", "fp32"]
    launch(*argv, "--out", str(tmp_path / "two"))
    assert main([*argv, "--out", str(tmp_path / "one")]) == 0
    two = json.loads((tmp_path / "two" / "bench.json").read_text())
    one = json.loads((tmp_path / "one" / "bench.json").read_text())
    assert two["processes"] == 2 and one["processes"] == 1
    assert [r["method"] for r in two["rows"]] == [r["method"] for r in one["rows"]] and len(one["rows"]) == 4
    for a, b in zip(two["rows"], one["rows"]):
        assert a["flops"] == b["flops"] and a["ssim"] == pytest.approx(b["ssim"], rel=1e-4, abs=1e-6)


def test_a_profile_interrupted_on_one_process_resumes_on_two(tiny_pipe_dir, tmp_path, monkeypatch):
    from ditaccel import profiling

    real, saves = profiling._save_partial, []

    def save_then_die(*args):
        real(*args)
        saves.append(args[-1])
        raise KeyboardInterrupt

    monkeypatch.setattr(profiling, "_save_partial", save_then_die)
    assert main(["profile", "--model", str(tiny_pipe_dir), *PROFILE, "--out", str(tmp_path / "p")]) == 130
    monkeypatch.setattr(profiling, "_save_partial", real)
    assert saves == [2] and (tmp_path / "p.partial.safetensors").exists()
    res = launch("profile", "--model", str(tiny_pipe_dir), *PROFILE, "--out", str(tmp_path / "p"))
    assert "resuming the interrupted profile" in res.stdout
    assert main(["profile", "--model", str(tiny_pipe_dir), *PROFILE, "--out", str(tmp_path / "one")]) == 0
    two, _ = io.load_artifact(tmp_path / "p", "profile")
    one, _ = io.load_artifact(tmp_path / "one", "profile")
    for name in ("e_cache", "e_cache_std", "e_prune"):
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-6, equal_nan=True, msg=name)
    assert not (tmp_path / "p.partial.safetensors").exists()
