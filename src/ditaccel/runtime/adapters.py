"""Where things are inside each supported diffusers block class: registry data, not code paths.

A new architecture is one entry: which submodules are self-attention / cross-attention / MLP, and
how a self-attention module can be asked for the outputs of a subset of query tokens while keys
and values come from all tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Residual:
    """How a block's output is made from its modules' outputs, ``x + sum_r gate_r * out_r``, so
    that a step reusing every module of every block can be computed as one weighted sum of the
    cached outputs (``runtime.collapse``).  The gates of role ``r`` are:

    - ``source="norm"``: output ``index[r]`` (rows, D) of the block's conditioning norm ``norm``,
      called as ``norm(x, **{arg: the block's arg for arg in norm_args}, <dtype_kwarg>=x.dtype)``;
    - ``source="table"``: chunk ``index[r]`` (rows, 1, D) of
      ``block.<table>[None] + <the block's table_arg>.reshape(rows, chunks, -1)``;

    and a role without an index is added ungated.  ``norm_kwargs`` renames a block argument for the
    norm call (SD3: the block's ``temb`` is the norm's ``emb``); ``part[r]``: the element of role
    ``r``'s output tuple that the residual adds (SD3's joint attention returns (image, text)).
    ``unless``: transformer call arguments that, when given, add to the stream between blocks or
    skip blocks (SD3's ControlNet residuals and ``skip_layers``): such a call runs the blocks.
    With ``chain_index`` (``source="norm"``), role
    ``r``'s gate is also chunk ``chain_index[r]`` of the last output of the block's conditioning
    chain (``BlockSpec.conditioning_chain``) split in ``chunks``: the collapse then reads the gates
    of all collapsed steps from the chain's table (``runtime.embed``) instead of calling the norm.
    ``embed`` (``source="norm"`` on a conditioning argument, not a timestep): the transformer
    submodule that makes the norm's first argument from the transformer call's ``embed_args``
    (SD3: ``time_text_embed(timestep, pooled_projections)`` is every block's ``temb``): the
    collapse then computes the gates of all collapsed steps at the first of them, in one norm
    call per block on their embeddings."""
    source: str
    index: dict[str, int]
    norm: str | None = None
    norm_args: tuple[str, ...] = ()
    dtype_kwarg: str | None = None
    table: str | None = None
    table_arg: str | None = None
    chunks: int = 0
    chain_index: dict[str, int] | None = None
    norm_kwargs: dict[str, str] = field(default_factory=dict)
    part: dict[str, int] = field(default_factory=dict)
    unless: tuple[str, ...] = ()
    embed: str | None = None
    embed_args: tuple[str, ...] = ()


@dataclass(frozen=True)
class BlockSpec:
    # role ("attn", "cross", "mlp") -> attribute of the block holding that module.  Hooking the
    # modules themselves caches their outputs before the block applies the current step's gate.
    modules: dict[str, str]
    # How self-attention is asked for the outputs of a subset of query tokens while keys and
    # values come from all tokens (see the partial attention functions in runtime.hooks):
    #   "kv_from_encoder_states": diffusers ``Attention`` without ``norm_cross``: the selected tokens
    #       as ``hidden_states``, all tokens as ``encoder_hidden_states``.
    #   "joint": SD3 joint attention over [image; text] (text tokens always computed).
    #   "flux": Flux attention over [text; image] with RoPE gathered for the selected queries.
    #   "wan": Wan self-attention with RoPE gathered for the selected queries.
    partial_attn: str = "kv_from_encoder_states"
    # What the hooked modules see: "image" tokens only, or "text_prefix": [text; image] tokens
    # (Flux single-stream blocks); text tokens are never pruned.
    module_tokens: str = "image"
    # The block's forward: which argument holds the image tokens, which the text tokens of a joint
    # block, which the positions (RoPE) and in what layout ("flux": (cos, sin) of shape
    # (text + image, head_dim), "wan": (cos, sin) of shape (1, image, 1, head_dim)), and, for blocks
    # that return a tuple, where the image tokens are in it.
    image_arg: str = "hidden_states"
    text_arg: str | None = None
    rope_arg: str | None = None
    rope_layout: str | None = None
    image_output: int | None = None
    # The norm whose output feeds only one module, per role, keyed by the block's ``variant_attr``
    # value (diffusers' BasicTransformerBlock wires its norms differently per ``norm_type``).  On a
    # step that reuses the module, the norm runs on one token and its output is broadcast: the
    # module ignores it, and the norm's elementwise work is skipped.
    variant_attr: str | None = None
    input_norms: dict[str, dict[str, str]] = field(default_factory=dict)
    # Per variant, the one of those norms that also computes the block's conditioning (adaLN
    # shifts, scales and gates) from the call's ``timestep`` and ``class_labels`` alone: all its
    # outputs but the first (the normalised tokens) depend on nothing else.  On the steps that reuse
    # the module it feeds, the runtime computes them for all such steps of a trajectory in one
    # batched call of the norm (see ``apply(..., batch_conditioning=...)``).
    conditioning_norm: dict[str, str] = field(default_factory=dict)
    # Per variant, the submodules (dotted paths in the block) that make the block's conditioning
    # from the call's timestep and class labels alone: the first is called as
    # ``emb(timestep, class_labels, ...)``, each next one on the previous one's output alone.  On
    # the steps a plan accelerates they are served from a table built once per trajectory
    # (runtime.embed).
    conditioning_chain: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # Per variant, how the block's output is made from its modules' outputs (see Residual); a
    # block without one runs every reusing step through its own forward.
    residual: dict[str, Residual] = field(default_factory=dict)

    def _variant(self, block: torch.nn.Module):
        return getattr(block, self.variant_attr, None) if self.variant_attr else None

    def norms_of(self, block: torch.nn.Module) -> dict[str, str]:
        return self.input_norms.get(self._variant(block), {})

    def conditioning_of(self, block: torch.nn.Module) -> str | None:
        return self.conditioning_norm.get(self._variant(block))

    def chain_of(self, block: torch.nn.Module) -> tuple[torch.nn.Module, ...]:
        """The block's conditioning chain (empty where it has none, or not all of it)."""
        try:
            return tuple(block.get_submodule(p) for p in self.conditioning_chain.get(self._variant(block), ()))
        except AttributeError:
            return ()

    def residual_of(self, block: torch.nn.Module) -> Residual | None:
        return self.residual.get(self._variant(block))


BLOCKS: dict[str, BlockSpec] = {
    # DiT (ada_norm_zero) and PixArt (ada_norm_single): attn1 -> gate -> residual, attn2 (cross,
    # PixArt only, no gate), ff -> gate -> residual.  Absolute positions enter before the blocks.
    "BasicTransformerBlock": BlockSpec(
        modules={"attn": "attn1", "cross": "attn2", "mlp": "ff"}, variant_attr="norm_type",
        input_norms={"ada_norm_zero": {"attn": "norm1", "cross": "norm2", "mlp": "norm3"},
                     "ada_norm_single": {"attn": "norm1", "mlp": "norm2"}},
        # DiT: each block embeds the timestep and class label again in norm1 (AdaLayerNormZero)
        conditioning_norm={"ada_norm_zero": "norm1"},
        conditioning_chain={"ada_norm_zero": ("norm1.emb", "norm1.silu", "norm1.linear")},
        # DiT: x + gate_msa * attn1 + gate_mlp * ff, the gates from norm1 (its outputs 1 and 4:
        # chunks 2 and 5 of 6 of norm1.linear's output);
        # PixArt: the gates from the block's scale_shift_table and the embedded timestep (chunks 2
        # and 5 of 6), attn2's output added ungated
        residual={"ada_norm_zero": Residual("norm", {"attn": 1, "mlp": 4}, norm="norm1",
                                            norm_args=("timestep", "class_labels"), dtype_kwarg="hidden_dtype",
                                            chunks=6, chain_index={"attn": 2, "mlp": 5}),
                  "ada_norm_single": Residual("table", {"attn": 2, "mlp": 5}, table="scale_shift_table",
                                              table_arg="timestep", chunks=6)}),
    # SD3 / SD3.5 MMDiT: joint attention over [image; text], then image MLP ``ff`` (the text MLP
    # ``ff_context`` is always computed: text tokens are few and never pruned).  Returns
    # (text, image).  Image stream: x + gate_msa * attn[0] + gate_mlp * ff, the gates from norm1
    # (AdaLayerNormZero on the block's temb: outputs 1 and 4); SD3.5's dual-attention blocks add
    # attn2 as well and are left to their own forward.  The text stream feeds only the next blocks'
    # attention, so a step whose blocks all reuse needs none of it.
    "JointTransformerBlock": BlockSpec(modules={"attn": "attn", "mlp": "ff"}, partial_attn="joint",
                                       text_arg="encoder_hidden_states", image_output=1,
                                       variant_attr="use_dual_attention",
                                       residual={False: Residual("norm", {"attn": 1, "mlp": 4}, norm="norm1",
                                                                 norm_args=("temb",), norm_kwargs={"temb": "emb"},
                                                                 part={"attn": 0},
                                                                 unless=("block_controlnet_hidden_states",
                                                                         "skip_layers"),
                                                                 embed="time_text_embed",
                                                                 embed_args=("timestep", "pooled_projections"))}),
    # Flux double-stream block: joint attention over [text; image] with RoPE, image MLP ``ff``.
    "FluxTransformerBlock": BlockSpec(modules={"attn": "attn", "mlp": "ff"}, partial_attn="flux",
                                      text_arg="encoder_hidden_states", rope_arg="image_rotary_emb",
                                      rope_layout="flux", image_output=1),
    # Flux single-stream block: concatenates [text; image] itself; attention (no output projection)
    # and ``proj_mlp`` run in parallel on it, then ``proj_out`` (always computed on all tokens,
    # it mixes both branches) and the gate.
    "FluxSingleTransformerBlock": BlockSpec(modules={"attn": "attn", "mlp": "proj_mlp"}, partial_attn="flux",
                                            module_tokens="text_prefix", text_arg="encoder_hidden_states",
                                            rope_arg="image_rotary_emb", rope_layout="flux", image_output=1),
    # Wan 2.x video block: self-attention with 3-d RoPE, cross-attention to text (no gate), FFN.
    "WanTransformerBlock": BlockSpec(modules={"attn": "attn1", "cross": "attn2", "mlp": "ffn"},
                                     partial_attn="wan", rope_arg="rotary_emb", rope_layout="wan"),
}


class UnsupportedModel(ValueError):
    pass


def transformer_of(target, what: str = "ditaccel") -> torch.nn.Module:
    """The transformer of ``target`` (a diffusers pipeline, or the transformer module itself);
    an :class:`UnsupportedModel` naming what the pipeline has instead (a UNet, say) otherwise."""
    transformer = getattr(target, "transformer", None)
    if isinstance(transformer, torch.nn.Module):
        return transformer
    if isinstance(target, torch.nn.Module):
        return target
    if hasattr(target, "components") and isinstance(getattr(target, "components", None), dict):
        nets = [f"{k}: {type(v).__name__}" for k, v in target.components.items() if isinstance(v, torch.nn.Module)]
        raise UnsupportedModel(f"{type(target).__name__} has no transformer to accelerate (it has "
                               f"{', '.join(nets) or 'no model'}); {what} works on DiT pipelines, whose "
                               f"denoiser is pipe.transformer (supported blocks: {', '.join(sorted(BLOCKS))})")
    raise UnsupportedModel(f"expected a diffusers pipeline or its transformer, got {type(target).__name__}; "
                           "pass the pipeline (e.g. ditaccel.load_pipeline(...)) or pipe.transformer")


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
    """Image tokens per sample at the model's default size (or the given size of its input, in
    latent pixels): (H / patch) * (W / patch)."""
    cfg = transformer.config
    size = getattr(cfg, "sample_size", None)
    h, w = (height or size), (width or size)
    patch = getattr(cfg, "patch_size", None)
    if h is None or w is None or not isinstance(patch, int):
        raise UnsupportedModel(f"{type(transformer).__name__} has no default image size; give the "
                               "number of image tokens per sample (num_tokens) for the size you sample at")
    return (h // patch) * (w // patch)


def modules_of(transformer: torch.nn.Module) -> tuple[str, ...]:
    """The roles every block of this transformer has, in canonical order."""
    from ..plan import MODULES

    blocks = find_blocks(transformer)
    roles = set.intersection(*(set(block_modules(b, s)) for _, b, s in blocks))
    return tuple(m for m in MODULES if m in roles)
