"""Shared by subcommands: the per-user cache folder and a profile reused from it when it fits."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(arg: str | None) -> Path:
    """``arg`` if given, else ``$XDG_CACHE_HOME/ditaccel`` (``~/.cache/ditaccel``)."""
    if arg:
        return Path(arg)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ditaccel"


def cached_profile(pipe, *, sampler: str, steps: int, cfg: float, samples: int, folder: Path,
                   reprofile: bool = False, classes: list[int] | None = None):
    """A SODA profile of ``pipe`` for this sampler, step count and guidance, from ``folder`` if one
    made there before still fits the model (fingerprint), else profiled now (``samples``
    trajectories, classes cycled, seeds from 100000) and kept there."""
    from .. import io
    from ..io import model_fingerprint
    from ..profiling import Profile, ProfileError, ages_suffix, profile

    classes = classes or list(range(10))
    fp = model_fingerprint(pipe.transformer)
    stem = folder / f"profile-{fp}-{sampler}{steps}-cfg{cfg:g}-s{samples}{ages_suffix(steps)}"
    if not reprofile and io.artifact_exists(stem):
        try:
            prof = Profile.load(stem)
            prof.check_for(fingerprint=fp, sampler=sampler, num_steps=steps)
            print(f"using the cached profile {stem}.json")
            return prof
        except (ProfileError, io.ArtifactError) as e:
            print(f"cached profile not usable ({e}); profiling again")
    print(f"profiling {samples} trajectories ({sampler}-{steps}, CFG {cfg:g}) ...")
    from .. import distributed as dist

    # one batch per process (one in all on a single process): the samples are split, not repeated
    prof = profile(pipe, class_labels=[classes[i % len(classes)] for i in range(samples)], sampler=sampler,
                   steps=steps, guidance_scale=cfg, seed=100_000, batch_size=-(-samples // dist.size()))
    if dist.is_main():
        stem.parent.mkdir(parents=True, exist_ok=True)
        prof.save(stem)
    dist.barrier()
    return prof
