"""Sampling a DiT pipeline with a chosen diffusers scheduler, seeded per image, and counting what
it cost: class-conditional ones (ours, diffusers' ``DiTPipeline``) take class ids, text-conditioned
ones (``TextPixelPipeline``, anything whose ``__call__`` takes ``prompt``) take prompts, or class
ids, which become the evaluation prompt naming that Fashion-MNIST class."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from .devices import synchronize
from .metrics import transformer_flops
from .pipeline import SAMPLERS, default_sampler, make_scheduler
from .runtime.apply import state_of
from .runtime.state import NonFiniteOutput
from .runtime.summary import per_step


@dataclass
class RunStats:
    wall_s: float
    calls: int
    flops: int
    flops_per_call: int
    images: int
    sampler: str
    steps: int
    guidance_scale: float
    seed: int
    method: str = "full"
    per_step: list | None = None  # what an applied plan computed per step (one image's run)
    cpu_s: float = 0.0  # CPU time of this process over the sampling (all threads)

    def to_dict(self) -> dict:
        return asdict(self)


class CallCounter:
    """Counts transformer calls and batch rows, and keeps the inputs of the first call (to count
    its FLOPs: a transformer's cost is per row, so total = FLOPs(first) * rows / rows(first))."""

    def __init__(self, module: torch.nn.Module):
        self.calls, self.rows, self.first = 0, 0, None
        self._handle = module.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        if self.first is None:
            self.first = (args, dict(kwargs), x.shape[0])
        self.calls += 1
        self.rows += x.shape[0]

    def remove(self) -> None:
        self._handle.remove()


SEED_LIMIT = 2 ** 64  # torch.Generator.manual_seed takes 0 .. 2**64 - 1


def generators(seed: int, n: int) -> list[torch.Generator]:
    """One generator per image: image i is the same whatever the batch it is made in."""
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


def image_numel(pipe) -> int:
    """Values in one output image of ``pipe`` (channels x height x width): a pixel-space DiT's
    own sample size, or a latent one's times its VAE's scale factor (3 channels)."""
    cfg = pipe.transformer.config
    size = cfg.get("sample_size") or 64
    size = size if isinstance(size, int) else int(np.prod(size)) ** 0.5
    if getattr(pipe, "vae", None) is not None:
        return 3 * int(size * getattr(pipe, "vae_scale_factor", 8)) ** 2
    return int(cfg.get("out_channels") or cfg.get("in_channels") or 3) * int(size) ** 2


def check_steps(scheduler, steps: int) -> None:
    """A one-line ValueError when ``steps`` is more than ``scheduler``'s training timesteps (a
    sampler cannot space more steps than it was trained with)."""
    train_steps = scheduler.config.get("num_train_timesteps")
    if train_steps and steps > train_steps:
        raise ValueError(f"{steps} sampling steps is more than the scheduler's {train_steps} training "
                         f"timesteps; sample with at most {train_steps}")


def check_run(pipe, count: int, *, steps: int, guidance_scale: float, seed: int, scheduler) -> None:
    """One-line ValueErrors for a run :func:`sample` cannot make well: a non-finite guidance
    scale, seeds past what a generator takes, more steps than the scheduler's training
    timesteps, or more images than host memory holds (they are all kept)."""
    import math

    from .devices import check_memory

    if not math.isfinite(guidance_scale):
        raise ValueError(f"the guidance scale must be a finite number, got {guidance_scale}")
    if not (isinstance(seed, int) and 0 <= seed and seed + count <= SEED_LIMIT):
        raise ValueError(f"the seed must be an integer with 0 <= seed and seed + images <= 2**64 (image i "
                         f"uses seed + i), got {seed}")
    check_steps(scheduler, steps)
    # the images as float32, twice (the batches and their concatenation)
    check_memory(count * image_numel(pipe) * 4 * 2, f"{count} images",
                 "make fewer images per run (the run keeps them all)")


def is_text_pipeline(pipe) -> bool:
    import inspect

    params = inspect.signature(type(pipe).__call__).parameters
    return "prompt" in params and "class_labels" not in params


def num_classes(pipe) -> int:
    """How many class ids ``pipe`` takes: a class-conditional DiT's label count, or the ten
    Fashion-MNIST classes a text pipeline's evaluation prompts name."""
    if is_text_pipeline(pipe):
        from .captions import NAMES

        return len(NAMES)
    n = getattr(pipe.transformer.config, "num_embeds_ada_norm", None)
    if not n:
        raise ValueError(f"{type(pipe.transformer).__name__} is neither class- nor text-conditioned")
    return int(n)


def conditions_for(pipe, conditions) -> list:
    """What ``pipe`` is called with: prompts for a text pipeline (class ids become
    :func:`ditaccel.captions.eval_prompt`), class ids for a class-conditional one."""
    conds = list(conditions)
    if is_text_pipeline(pipe):
        from .captions import eval_prompt

        return [c if isinstance(c, str) else eval_prompt(int(c)) for c in conds]
    if any(isinstance(c, str) for c in conds):
        raise ValueError("this pipeline is class-conditional: give class ids, not prompts")
    return [int(c) for c in conds]


def call_pipe(pipe, conds: list, **kwargs):
    """``pipe`` called on class ids or prompts (from :func:`conditions_for`)."""
    if conds and isinstance(conds[0], str):
        return pipe(prompt=conds, **kwargs)
    return pipe(class_labels=conds, **kwargs)


def sample(pipe, class_labels, *, sampler: str | None = None, steps: int | None = None,
           guidance_scale: float = 1.5, seed: int = 0, batch_size: int = 64,
           progress: bool = True, count_flops: bool = True) -> tuple[torch.Tensor, RunStats]:
    """Images (N, C, H, W) in [0, 1] for ``class_labels`` (class ids, or prompts for a text
    pipeline) and the run's statistics.

    The pipeline's scheduler is swapped for ``sampler`` (default: the model's own kind, see
    :func:`ditaccel.pipeline.default_sampler`) during the call and restored after.

    Example::

        images, stats = ditaccel.sample(pipe, [0, 7, 9], sampler="ddim", steps=50, seed=0)
        stats.flops, stats.wall_s
    """
    from .runtime.adapters import transformer_of

    transformer_of(pipe, "sampling")
    sampler = sampler or default_sampler(pipe.scheduler)
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    steps = SAMPLERS[sampler][2] if steps is None else steps
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    labels = conditions_for(pipe, class_labels)
    original = pipe.scheduler
    scheduler = make_scheduler(sampler, original.config)
    check_run(pipe, len(labels), steps=steps, guidance_scale=guidance_scale, seed=seed, scheduler=scheduler)
    pipe.scheduler = scheduler
    counter = CallCounter(pipe.transformer)
    out = []
    try:
        dev = getattr(pipe, "_execution_device", None)
        synchronize(dev)
        t0, c0 = time.perf_counter(), time.process_time()
        for i in tqdm(range(0, len(labels), batch_size), desc=f"{sampler} x{steps}",
                      disable=not progress or len(labels) <= batch_size):
            res = call_pipe(pipe, labels[i:i + batch_size], guidance_scale=guidance_scale,
                            generator=generators(seed + i, len(labels[i:i + batch_size])),
                            num_inference_steps=steps, output_type="np")
            out.append(torch.from_numpy(np.asarray(res.images)).permute(0, 3, 1, 2).float())
            if not torch.isfinite(out[-1]).all():
                raise NonFiniteOutput(_non_finite_message(pipe, i, state_of(pipe.transformer)))
        synchronize(dev)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    finally:
        counter.remove()
        pipe.scheduler = original
    per_call, flops, steps_info = 0, 0, None
    state = state_of(pipe.transformer)
    if count_flops and state is not None:
        # A plan's calls differ in cost; count one image's run exactly (every row of a batch
        # computes the same token counts, so FLOPs scale with the number of images).
        state.count_flops = True
        try:
            pipe.scheduler = make_scheduler(sampler, original.config)
            call_pipe(pipe, labels[:1], guidance_scale=guidance_scale, generator=generators(seed, 1),
                      num_inference_steps=steps, output_type="np")
        finally:
            state.count_flops = False
            pipe.scheduler = original
        steps_info = per_step(state)
        one_image = sum(r["flops"] for r in steps_info)
        flops = one_image * len(labels)
        per_call = one_image // max(1, sum(r["calls"] for r in steps_info))
    elif count_flops and counter.first is not None:
        args, kwargs, rows = counter.first
        per_call = transformer_flops(pipe.transformer, *args, **kwargs)
        flops = per_call * counter.rows // rows
    stats = RunStats(wall_s=wall, cpu_s=cpu, calls=counter.calls, flops=int(flops), flops_per_call=per_call,
                     images=len(labels), sampler=sampler, steps=steps,
                     guidance_scale=guidance_scale, seed=seed,
                     method=state.plan.method if state is not None else "full", per_step=steps_info)
    return torch.cat(out), stats


def _non_finite_message(pipe, first: int, state) -> str:
    """What to say when a batch's images hold NaN or inf (the plan's NaN guard, where a plan runs
    with it, names the step and module first)."""
    where = f"the images from image {first} on hold NaN or inf"
    bad = next((name for name, p in pipe.transformer.named_parameters()
                if p.is_floating_point() and not torch.isfinite(p).all()), None)
    if bad is not None:
        return f"{where}: the model's weights are not finite ({bad}); the weights are damaged, load good ones"
    how = "the full model" if state is None else f"the plan ({state.plan.method})"
    return (f"{where}, computed by {how}: the model overflowed in this precision or with this guidance "
            "scale; try --dtype fp32 or a smaller guidance scale")


def speedup_pairs(pipe, timed, attach, repeats: int = 3, baseline=None) -> list[float]:
    """Wall-clock ratios (full model / method) of ``timed(pipe)``: the full model and the method
    back to back, ``repeats`` times with the order alternating (take the median).  ``attach(pipe)``
    switches the method on and returns the function that switches it off; the method is off
    between and after the pairs.  ``baseline``: an attach like it for the full side (e.g. the full
    plan compiled; default the pipeline as it is).  Warm the pipeline up before the first call."""
    dev = getattr(pipe, "_execution_device", None)
    ratios = []
    for r in range(repeats):
        walls = {}
        for which in (("full", "method") if r % 2 == 0 else ("method", "full")):
            detach = attach(pipe) if which == "method" else baseline(pipe) if baseline is not None else None
            try:
                synchronize(dev)
                t = time.perf_counter()
                timed(pipe)
                synchronize(dev)
                walls[which] = time.perf_counter() - t
            finally:
                if detach is not None:
                    detach()
        ratios.append(walls["full"] / walls["method"])
    return ratios


def as_images(output) -> torch.Tensor:
    """A pipeline run's images as a float tensor: a tensor, or an object with ``.images`` (tensor,
    numpy array or list of PIL images)."""
    images = getattr(output, "images", output)
    if isinstance(images, (tuple, list)) and images and not torch.is_tensor(images[0]):
        images = np.stack([np.asarray(im, dtype=np.float32) / 255.0 for im in images])
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.asarray(images, dtype=np.float32))
    if not torch.is_tensor(images):
        raise TypeError("run(pipe) must return images: a tensor, or an output with .images")
    return images.detach().float().cpu()
