"""Running on several processes through Hugging Face accelerate (torch.distributed underneath).

Launched by ``accelerate launch --multi_gpu --num_processes N -m ditaccel ...`` (or torchrun), every
process sees the world through :func:`world`; launched plainly, the world is one process and
every function here is a no-op.  On machines without CUDA the processes talk over gloo (accelerate's
MULTI_CPU), which is what the CI test uses on loopback.

What ditaccel does with it: profiling shards the calibration batches across processes and sums
the error tables; Shiva training splits every batch across processes (data parallel, gradients
and the budget's batch statistics averaged); ``bench`` splits its methods.  Only the main process
writes files.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

_CPU = {"forced": False}


def force_cpu() -> None:
    """Place this process on the CPU (gloo between processes) even where CUDA is present: what
    ``--device cpu`` does.  Takes effect when called before anything else here."""
    _CPU["forced"] = True


@functools.lru_cache(maxsize=1)
def world():
    """accelerate's PartialState for this process (created once): on this process's GPU (NCCL
    between processes) where CUDA is present, unless :func:`force_cpu` or ``DITACCEL_DEVICE=cpu``
    says otherwise; on the CPU (gloo) elsewhere."""
    from accelerate import PartialState

    from .devices import default_spec

    cpu = _CPU["forced"] or default_spec() == "cpu" or not torch.cuda.is_available()
    state = PartialState(cpu=cpu)
    if state.num_processes > 1:
        import atexit

        # leave the process group before the interpreter exits: a process that finished its share
        # first and exited with its group alive could abort (SIGABRT), and the launcher then
        # stopped the main process before it wrote the gathered rows
        atexit.register(state.destroy_process_group)
    return state


def rank() -> int:
    return world().process_index


def size() -> int:
    return world().num_processes


def is_main() -> bool:
    return world().is_main_process


def device() -> torch.device:
    return world().device


def all_sum(t: torch.Tensor) -> torch.Tensor:
    """The sum of ``t`` over all processes (a new tensor, on ``t``'s device)."""
    if size() == 1:
        return t.clone()
    from accelerate.utils import reduce

    return reduce(t.to(device()), reduction="sum").to(t.device)


def all_mean(t: torch.Tensor) -> torch.Tensor:
    return all_sum(t) / size()


def broadcast(obj: Any, src: int = 0) -> Any:
    """``obj`` from process ``src`` on every process (through torch.distributed's object
    broadcast between our own processes; nothing is read from files)."""
    if size() == 1:
        return obj
    from accelerate.utils import broadcast_object_list

    box = [obj]
    broadcast_object_list(box, from_process=src)
    return box[0]


def barrier() -> None:
    if size() > 1:
        world().wait_for_everyone()
