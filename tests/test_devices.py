"""Device placement: ``--device`` / ``device=`` resolution and the CPU side of the plumbing that
keeps random draws and measured tables device-independent.  The CUDA half is tests/test_cuda.py."""

import pytest
import torch

from ditaccel.devices import resolve_device, synchronize
from ditaccel.registry import load_pipeline, resolve_dtype
from tests.conftest import tiny_dit

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only answers")


def test_cpu_and_auto(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    # no spec: $DITACCEL_DEVICE (conftest sets cpu for the default run), else auto
    assert resolve_device(None).type == "cpu"
    monkeypatch.delenv("DITACCEL_DEVICE")
    assert resolve_device(None).type == expected


@no_cuda
def test_cuda_refused_without_cuda():
    for spec in ("cuda", "cuda:0"):
        with pytest.raises(ValueError, match="no CUDA device") as info:
            resolve_device(spec)
        assert "\n" not in str(info.value) and "--device cpu" in str(info.value)


@pytest.mark.parametrize("spec,needle", [("mps", "CPU or on CUDA"), ("meta", "CPU or on CUDA"),
                                         ("gpu!", "is not a device"), ("cuda:x", "is not a device")])
def test_bad_specs(spec, needle):
    with pytest.raises(ValueError, match=needle):
        resolve_device(spec)


def test_dtype_auto_follows_the_device():
    assert resolve_dtype("auto", "cuda") == "bf16"  # no GPU needed: a statement about CUDA
    from ditaccel.registry import native_bf16

    assert resolve_dtype("auto", "cpu") == ("bf16" if native_bf16("cpu") else "fp32")
    assert resolve_dtype("fp16", "cpu") == "fp16"


def test_synchronize_waits_on_cuda_only(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(device))
    synchronize("cpu")
    synchronize(None)
    synchronize(torch.device("cpu"))
    assert calls == [], "nothing to wait for off CUDA"
    synchronize("cuda:0")
    assert calls == ["cuda:0"]


def test_load_pipeline_device(tmp_path):
    from diffusers import DDIMScheduler

    from ditaccel.models.reference import NOISE_SCHEDULE
    from ditaccel.pipeline import DiTPixelPipeline

    DiTPixelPipeline(transformer=tiny_dit(), scheduler=DDIMScheduler(**NOISE_SCHEDULE)).save_pretrained(
        tmp_path / "p", safe_serialization=True)
    pipe = load_pipeline(str(tmp_path / "p"), "fp32", "cpu")
    assert pipe.device == torch.device("cpu")
    assert {p.device.type for p in pipe.transformer.parameters()} == {"cpu"}
