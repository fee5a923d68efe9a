"""Where ditaccel computes: ``--device`` on the command line, ``device=`` in the Python API.

``auto`` is a CUDA device where torch sees one (under ``accelerate launch``: this process's own
GPU, ``cuda:<local rank>``), else the CPU.  Random draws stay on the CPU (seeded
``torch.Generator``s) and are moved to the device, so a seed gives the same noise on every device;
measured tables (profile sums) come back to the CPU before they are reduced or saved.
"""

from __future__ import annotations

import os

import torch

CHOICES = "auto, cpu, cuda or cuda:N"
ENV = "DITACCEL_DEVICE"  # the default of --device (auto where unset)


def default_spec() -> str:
    return os.environ.get(ENV) or "auto"


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """``spec`` as a torch device this machine has, or a one-line ``ValueError`` saying what to
    pass instead."""
    from . import distributed as dist

    if spec is None:
        spec = default_spec()
    if spec == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        spec = "cuda"
    try:
        dev = torch.device(spec)
    except (RuntimeError, TypeError):
        raise ValueError(f"--device {spec!r} is not a device; use {CHOICES}") from None
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.type != "cuda":
        raise ValueError(f"--device {spec}: ditaccel runs on the CPU or on CUDA; use {CHOICES}")
    if not torch.cuda.is_available():
        raise ValueError(f"--device {spec}: torch sees no CUDA device here (torch.cuda.is_available() is "
                         "False, or this torch build is CPU-only); use --device cpu or auto")
    if dev.index is None:  # this process's GPU: its own one under a multi-process launch
        return dist.device() if dist.size() > 1 else torch.device("cuda", torch.cuda.current_device())
    if dev.index >= torch.cuda.device_count():
        raise ValueError(f"--device {spec}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                         f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return dev


def synchronize(device: torch.device | str | None) -> None:
    """Wait for ``device``'s queued work (CUDA runs asynchronously; a wall clock read without this
    measures the launches, not the work).  A no-op on the CPU."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def check_memory(nbytes: float, what: str, fix: str) -> None:
    """Refuse work whose buffers would not fit: ``nbytes`` (an estimate of what the run keeps in
    host memory at once) against the memory available now; a one-line ValueError
    ``"{what} would need about 12.3 GiB of memory, 3.1 GiB is available; {fix}"``."""
    import psutil

    free = psutil.virtual_memory().available
    if nbytes > free:
        raise ValueError(f"{what} would need about {nbytes / 2 ** 30:.3g} GiB of memory, "
                         f"{free / 2 ** 30:.1f} GiB is available; {fix}")
