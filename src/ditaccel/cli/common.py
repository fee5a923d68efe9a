"""Shared by subcommands: the class-list option, the per-user cache folder and a profile reused
from it when it fits."""

from __future__ import annotations

import os
from pathlib import Path


def parse_classes(text: str | None, num_classes: int, default: list[int] | None = None) -> list[int]:
    """``--classes`` (comma-separated class ids, each in ``0..num_classes-1``) as a list; ``default``
    where the option was not given.  Raises ValueError with the one line to show.

    Example::

        parse_classes("0,7,9", 10)  # [0, 7, 9]
    """
    if text is None and default is not None:
        return default
    try:
        classes = [int(c) for c in (text or "").split(",") if c.strip() != ""]
    except ValueError:
        raise ValueError(f"--classes must be comma-separated integers like 0,1,2, got {text!r}") from None
    if not classes:
        raise ValueError("--classes is empty; give at least one class id, e.g. --classes 0,1,2")
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad:
        raise ValueError(f"--classes must be in 0..{num_classes - 1} (this model's classes); "
                         f"{', '.join(map(str, bad))} out of range")
    return classes


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
    from ..profiling import Profile, ProfileConfig, ProfileError, ages_suffix, profile

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
    prof = profile(pipe, config=ProfileConfig(
        class_labels=[classes[i % len(classes)] for i in range(samples)], sampler=sampler, steps=steps,
        guidance_scale=cfg, seed=100_000, batch_size=-(-samples // dist.size())))
    if dist.is_main():
        stem.parent.mkdir(parents=True, exist_ok=True)
        prof.save(stem)
    dist.barrier()
    return prof


# -- numeric options: checked where argparse reads them, so a bad value names its flag -------------

INT64 = 2 ** 63


def number(kind: type = float, lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
           hi_open: bool = False, what: str | None = None):
    """An argparse ``type=`` that reads an ``int`` or a finite ``float`` in ``[lo, hi]`` (ends
    open where asked) and otherwise raises ``ArgumentTypeError`` with what it must be; argparse
    adds the flag's name.  ``what`` replaces the generated description of the range.

    >>> number(float, 1)("inf")
    Traceback (most recent call last):
    argparse.ArgumentTypeError: must be a finite number >= 1, got 'inf'
    """
    import argparse
    import math

    noun = "an integer" if kind is int else "a finite number"
    parts = []
    if lo is not None:
        parts.append(f"{'>' if lo_open else '>='} {lo:g}")
    if hi is not None:
        parts.append(f"{'<' if hi_open else '<='} {hi:g}")
    rule = what or " ".join([noun, " and ".join(parts)]).strip()

    def parse(text: str):
        try:
            value = int(text, 10) if kind is int else float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text!r}") from None
        if kind is int and not -INT64 <= value < INT64:
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text!r} (too large)")
        if (kind is float and not math.isfinite(value)) or (
                lo is not None and (value <= lo if lo_open else value < lo)) or (
                hi is not None and (value >= hi if hi_open else value > hi)):
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text!r}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its own messages
    return parse


# what a bare ``type=int`` / ``type=float`` means on ditaccel's command line (see ``register``)
ANY_INT = number(int, what="an integer")
FINITE_FLOAT = number(float, what="a finite number")
SEED = number(int, 0, INT64 - 1, what="an integer in [0, 2**63)")


def floats_list(text: str, flag: str) -> tuple[float, ...]:
    """Comma-separated finite numbers, e.g. ``1,2,3``; a one-line ValueError naming ``flag`` else."""
    import math

    try:
        values = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"{flag} must be comma-separated numbers, got {text!r}") from None
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"{flag} must be finite numbers, got {text!r}")
    return values

