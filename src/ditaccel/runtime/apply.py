"""Attach a Plan to a pipeline or transformer, and take it off again."""

from __future__ import annotations

import torch

from ..io import model_fingerprint
from ..plan import Plan
from .adapters import block_modules, find_blocks
from .hooks import MODULE_HOOK, STEP_HOOK, ModuleHook, StepHook, register, unregister
from .state import PlanMismatch, RunState

_STATE_ATTR = "_ditaccel_state"


def _split(target) -> tuple[torch.nn.Module, object | None]:
    transformer = getattr(target, "transformer", None)
    if isinstance(transformer, torch.nn.Module):
        return transformer, target
    if isinstance(target, torch.nn.Module):
        return target, None
    raise TypeError(f"expected a diffusers pipeline or transformer, got {type(target).__name__}")


def apply(target, plan: Plan, check_fingerprint: bool = True):
    """Execute ``plan`` on every call of the target's transformer.  Applying again replaces the
    previous plan; :func:`remove` restores the original forward functions."""
    transformer, pipe = _split(target)
    blocks = find_blocks(transformer)
    if len(blocks) != plan.num_layers:
        raise PlanMismatch(f"the plan has {plan.num_layers} layers but {type(transformer).__name__} "
                           f"has {len(blocks)} blocks; make the plan for this model")
    fp = plan.meta.get("fingerprint")
    if check_fingerprint and fp is not None and fp != model_fingerprint(transformer):
        raise PlanMismatch("the plan was made for another model (fingerprint differs); "
                           "profile and plan this model, or pass check_fingerprint=False")
    per_block = [block_modules(block, spec) for _, block, spec in blocks]
    missing = sorted({m for mods in per_block for m in plan.modules if m not in mods})
    if missing:
        raise PlanMismatch(f"the plan acts on {missing} but the blocks of "
                           f"{type(transformer).__name__} have only {sorted(per_block[0])}")
    remove(transformer)

    def expected_steps():
        sched = getattr(pipe, "scheduler", None)
        ts = getattr(sched, "timesteps", None)
        return len(ts) if ts is not None else None

    state = RunState(plan, expected_steps if pipe is not None else (lambda: None))
    register(transformer, StepHook(state), STEP_HOOK)
    for layer, ((_, _, spec), mods) in enumerate(zip(blocks, per_block)):
        for role, module in mods.items():
            if role in plan.modules:
                register(module, ModuleHook(state, layer, role, plan.module_index(role), spec), MODULE_HOOK)
    setattr(transformer, _STATE_ATTR, state)
    return target


def remove(target):
    """Take every ditaccel hook off; the model then computes exactly as before ``apply``."""
    transformer, _ = _split(target)
    unregister(transformer, STEP_HOOK)
    for module in transformer.modules():
        unregister(module, MODULE_HOOK)
    if hasattr(transformer, _STATE_ATTR):
        delattr(transformer, _STATE_ATTR)
    return target


def state_of(target) -> RunState | None:
    transformer, _ = _split(target)
    return getattr(transformer, _STATE_ATTR, None)
