"""Planners: pure functions from a method's config and the model's shape to a Plan.

Each method file has the same parts: a frozen, self-validating ``Config`` and ``plan(config,
shape) -> Plan``.  ``METHODS`` maps CLI names to them.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import delta_dit, fora, toca


@dataclass(frozen=True)
class ModelShape:
    """What a planner needs to know about the model and the sampler."""
    num_steps: int
    num_layers: int
    num_tokens: int
    modules: tuple[str, ...] = ("attn", "mlp")


METHODS = {"fora": fora, "toca": toca, "delta-dit": delta_dit}


def model_shape(transformer, num_steps: int, num_tokens: int | None = None) -> ModelShape:
    """The shape of ``transformer`` sampled in ``num_steps`` steps; ``num_tokens`` (image tokens per
    sample) defaults to the model's configured sample size where it has one.

    Example::

        shape = ditaccel.model_shape(pipe.transformer, num_steps=50)  # layers, tokens, modules
    """
    from ..runtime.adapters import find_blocks, image_tokens, modules_of

    return ModelShape(num_steps=num_steps, num_layers=len(find_blocks(transformer)),
                      num_tokens=image_tokens(transformer) if num_tokens is None else num_tokens,
                      modules=modules_of(transformer))


def make_plan(method: str, shape: ModelShape, **options):
    """Plan ``method`` with the given config options (unknown options are an error).

    Example::

        plan = ditaccel.make_plan("toca", ditaccel.model_shape(pipe.transformer, 50), interval=3, ratio=0.25)
    """
    import dataclasses

    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    mod = METHODS[method]
    names = {f.name for f in dataclasses.fields(mod.Config)}
    bad = sorted(set(options) - names)
    if bad:
        raise ValueError(f"{method} has no option {', '.join(bad)}; its options: {', '.join(sorted(names))}")
    return mod.plan(mod.Config(**options), shape)
