"""Where things are inside each supported diffusers block class: registry data, not code paths.

A new architecture is one entry: which submodules are self-attention / cross-attention / MLP, and
how a self-attention module can be asked for the outputs of a subset of query tokens while keys
and values come from all tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class BlockSpec:
    # role ("attn", "cross", "mlp") -> attribute of the block holding that module
    modules: dict[str, str]
    # Self-attention partial recompute: call the attention on the selected tokens as
    # ``hidden_states`` and on all tokens as ``encoder_hidden_states`` (valid for diffusers
    # ``Attention`` without ``norm_cross``: queries from the former, keys/values from the latter).
    # "joint": MMDiT joint attention (SD3): image and text tokens attend together, the module
    # returns (image output, text output); text tokens are never pruned.
    partial_attn: str = "kv_from_encoder_states"


BLOCKS: dict[str, BlockSpec] = {
    # DiT (ada_norm_zero) and PixArt (ada_norm_single): attn1 -> gate -> residual, attn2 (cross,
    # PixArt only, no gate), ff -> gate -> residual.  Hooking the modules themselves caches their
    # outputs before the block applies the current step's gate.
    "BasicTransformerBlock": BlockSpec(modules={"attn": "attn1", "cross": "attn2", "mlp": "ff"}),
    # SD3 / SD3.5 MMDiT: joint attention over [image; text], then image MLP ``ff`` (the text MLP
    # ``ff_context`` is always computed: text tokens are few and never pruned).
    "JointTransformerBlock": BlockSpec(modules={"attn": "attn", "mlp": "ff"}, partial_attn="joint"),
}


class UnsupportedModel(ValueError):
    pass


def find_blocks(transformer: torch.nn.Module) -> list[tuple[str, torch.nn.Module, BlockSpec]]:
    """The transformer's blocks in execution order, with their specs."""
    blocks = [(name, m, BLOCKS[type(m).__name__]) for name, m in transformer.named_modules()
              if type(m).__name__ in BLOCKS]
    if not blocks:
        kinds = sorted({type(m).__name__ for m in transformer.modules() if "Block" in type(m).__name__})
        raise UnsupportedModel(
            f"{type(transformer).__name__} has no supported transformer block (found "
            f"{', '.join(kinds) or 'none'}); supported block classes: {', '.join(sorted(BLOCKS))}")
    return blocks


def block_modules(block: torch.nn.Module, spec: BlockSpec) -> dict[str, torch.nn.Module]:
    """role -> module, for the roles this block instance actually has (DiT has no attn2)."""
    out = {}
    for role, attr in spec.modules.items():
        mod = getattr(block, attr, None)
        if mod is not None:
            out[role] = mod
    return out


def image_tokens(transformer: torch.nn.Module, height: int | None = None, width: int | None = None) -> int:
    """Image tokens per sample at the model's default size (or the given size in pixels of its
    input space): (H / patch) * (W / patch)."""
    cfg = transformer.config
    size = cfg.sample_size
    h, w = (height or size), (width or size)
    return (h // cfg.patch_size) * (w // cfg.patch_size)


def modules_of(transformer: torch.nn.Module) -> tuple[str, ...]:
    """The roles every block of this transformer has, in canonical order."""
    from ..plan import MODULES

    blocks = find_blocks(transformer)
    roles = set.intersection(*(set(block_modules(b, s)) for _, b, s in blocks))
    return tuple(m for m in MODULES if m in roles)
