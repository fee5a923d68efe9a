"""Peer caching methods, applied to a pipeline the way a user of those libraries would, with the
plumbing they need on DiT-family models that do not provide it themselves.

- diffusers' own hooks (``diffusers.hooks.apply_*``): first-block cache, pyramid attention
  broadcast, FasterCache, TaylorSeer, MagCache (calibrated as its docs say: one run with
  ``calibrate=True``, whose printed ratios configure the cache);
- cache-dit (PyPI ``cache-dit``): DBCache, with and without its TaylorSeer calibrator.

What the plumbing adds (``DiTTransformer2DModel`` has no ``CacheMixin``; DiT pipelines set no cache
context and expose no current timestep): a cache context around every transformer call (one name:
classifier-free guidance runs both branches in one batched call), the current timestep read from
the call, and a reset of the hooks' state at the start of every trajectory (the timestep goes up,
or the batch changes).  Where a library's defaults fail on a DiT: TaylorSeer's default block
patterns hook nothing (the blocks are named), FasterCache assumes ``[uncond, cond]`` batches
(DiT pipelines batch ``[cond, uncond]``), cache-dit's default DBCache computes every block of
a shallow model (F1B0 with warm-up steps is used), and on SD3-style models, whose last joint block
returns ``None`` for its text stream, diffusers' FBC and TaylorSeer and cache-dit's TaylorSeer
calibrator fail (the block is given back its text input there, which the model discards, and
cache-dit's encoder calibrator is left off).

    handle = attach_peer(pipe, "fbc", 0.2, num_steps=50)
    images = pipe(...)
    handle.remove()

Each peer has one swept knob (``PEERS[name].knob``) and a default sweep from light to aggressive,
set so that it spans about 1.3x to 4x on the bundled model (a first quick run: FBC and DBCache at
threshold 0.2 skip almost every step there).
"""

from __future__ import annotations

import ast
import contextlib
import io
from dataclasses import dataclass
from typing import Any, Callable

import torch


class PeerUnavailable(RuntimeError):
    """The library a peer needs is not installed."""


@dataclass(frozen=True)
class Peer:
    name: str
    library: str
    knob: str
    sweep: tuple[float, ...]
    needs_calibration: bool = False
    note: str = ""


PEERS: dict[str, Peer] = {p.name: p for p in (
    Peer("fbc", "diffusers", "threshold", (0.02, 0.04, 0.08)),
    Peer("pab", "diffusers", "spatial_attention_block_skip_range", (2, 3, 6),
         note="self-attention only, timesteps 100-800 (diffusers' default range)"),
    Peer("fastercache", "diffusers", "spatial_attention_block_skip_range", (2, 3, 6),
         note="diffusers assumes [uncond, cond] batches; DiT pipelines batch [cond, uncond], so it "
              "computes the unconditional half and approximates the conditional one"),
    Peer("taylorseer", "diffusers", "cache_interval", (2, 3, 4, 6),
         note="blocks hooked through cache_identifiers (the default patterns hook nothing on DiT)"),
    Peer("magcache", "diffusers", "threshold", (0.01, 0.02, 0.04, 0.08), needs_calibration=True),
    Peer("dbcache", "cache-dit", "residual_diff_threshold", (0.02, 0.04, 0.08),
         note="F1B0, 4 warm-up steps (the default config computes every block of an 8-layer model)"),
    Peer("dbcache-taylorseer", "cache-dit", "residual_diff_threshold", (0.02, 0.04, 0.08),
         note="DBCache F1B0 + TaylorSeer calibrator of order 1"),
)}


class _Plumbing:
    """Forward pre/post hooks on the transformer: the current timestep, a cache context around
    every call, and a reset of diffusers' hook state when a new trajectory starts."""

    def __init__(self, transformer, context: bool, reset: Callable[[], None] | None):
        self.transformer, self.context, self.reset = transformer, context, reset
        self.timestep: float = 1000.0
        self._last: tuple[float, int] | None = None
        self._cm = None
        self._handles = [transformer.register_forward_pre_hook(self._pre, with_kwargs=True),
                         transformer.register_forward_hook(self._post, always_call=True)]

    def _pre(self, module, args, kwargs):
        t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        t = float(torch.as_tensor(t).flatten()[0]) if t is not None else self.timestep
        x = kwargs.get("hidden_states", args[0] if args else None)
        rows = int(x.shape[0]) if torch.is_tensor(x) else -1
        if self.reset is not None and (self._last is None or t >= self._last[0] or rows != self._last[1]):
            self.reset()
        self._last, self.timestep = (t, rows), t
        if self.context:
            from diffusers.models.cache_utils import CacheMixin

            self._cm = CacheMixin.cache_context(module, "cfg")
            self._cm.__enter__()

    def _post(self, module, args, output):
        if self._cm is not None:
            cm, self._cm = self._cm, None
            cm.__exit__(None, None, None)

    def current_timestep(self) -> float:
        return self.timestep

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


class PeerHandle:
    """An attached peer; :meth:`remove` takes it off again."""

    def __init__(self, name: str, remove: Callable[[], None], info: dict | None = None):
        self.name, self._remove, self.info = name, remove, info or {}

    def remove(self) -> None:
        self._remove()


def _registry(transformer):
    from diffusers.hooks import HookRegistry

    return HookRegistry.check_if_exists_or_initialize(transformer)


def _diffusers_hook_names(name: str) -> list[str]:
    from diffusers.hooks import faster_cache, first_block_cache, mag_cache, pyramid_attention_broadcast, taylorseer_cache

    return {"fbc": [first_block_cache._FBC_LEADER_BLOCK_HOOK, first_block_cache._FBC_BLOCK_HOOK],
            "pab": [pyramid_attention_broadcast._PYRAMID_ATTENTION_BROADCAST_HOOK],
            "fastercache": [faster_cache._FASTER_CACHE_DENOISER_HOOK, faster_cache._FASTER_CACHE_BLOCK_HOOK],
            "taylorseer": [taylorseer_cache._TAYLORSEER_CACHE_HOOK],
            "magcache": [mag_cache._MAG_CACHE_LEADER_BLOCK_HOOK, mag_cache._MAG_CACHE_BLOCK_HOOK]}[name]


def calibrate_magcache(pipe, run: Callable[[Any], Any], num_steps: int) -> list[float]:
    """MagCache's calibration, as its docs describe it: one run with ``calibrate=True`` (nothing is
    skipped); the per-step magnitude ratios it prints configure the cache."""
    from diffusers.hooks import MagCacheConfig, apply_mag_cache

    tf = pipe.transformer
    apply_mag_cache(tf, MagCacheConfig(calibrate=True, num_inference_steps=num_steps))
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            run(pipe)
    finally:
        reg = _registry(tf)
        for n in _diffusers_hook_names("magcache"):
            reg.remove_hook(n, recurse=True)
    lines = [ln for ln in buf.getvalue().strip().splitlines() if ln.strip().startswith("[")]
    if not lines:
        raise RuntimeError("MagCache's calibration printed no ratios; does run(pipe) call the pipeline "
                           f"with num_inference_steps={num_steps}?")
    return [float(v) for v in ast.literal_eval(lines[-1])]


def attach_peer(pipe, name: str, value: float, num_steps: int, mag_ratios: list[float] | None = None) -> PeerHandle:
    """Attach peer ``name`` with its knob at ``value`` to ``pipe.transformer`` (sampled in
    ``num_steps`` steps).  MagCache needs ``mag_ratios`` from :func:`calibrate_magcache`."""
    if name not in PEERS:
        raise ValueError(f"unknown peer {name!r}; choose one of {', '.join(PEERS)}")
    tf = pipe.transformer
    if PEERS[name].library == "cache-dit":
        return _attach_cache_dit(pipe, name, value, num_steps)
    import diffusers.hooks as dh

    reg = _registry(tf)
    plumbing = _Plumbing(tf, context=name in ("fbc", "taylorseer"), reset=reg.reset_stateful_hooks)
    restore_streams = _keep_text_streams(tf)  # before the peer's hooks, so that they wrap it
    try:
        if name == "fbc":
            dh.apply_first_block_cache(tf, dh.FirstBlockCacheConfig(threshold=float(value)))
        elif name == "pab":
            dh.apply_pyramid_attention_broadcast(tf, dh.PyramidAttentionBroadcastConfig(
                spatial_attention_block_skip_range=int(value), spatial_attention_timestep_skip_range=(100, 800),
                current_timestep_callback=plumbing.current_timestep))
        elif name == "fastercache":
            dh.apply_faster_cache(tf, dh.FasterCacheConfig(
                tensor_format="BCHW", current_timestep_callback=plumbing.current_timestep,
                spatial_attention_block_skip_range=int(value), spatial_attention_timestep_skip_range=(-1, 681),
                unconditional_batch_skip_range=5, unconditional_batch_timestep_skip_range=(-1, 641),
                attention_weight_callback=lambda _: 0.5,
                _unconditional_conditional_input_kwargs_identifiers=[
                    "hidden_states", "timestep", "class_labels", "encoder_hidden_states",
                    "encoder_attention_mask", "pooled_projections"]))
        elif name == "taylorseer":
            dh.apply_taylorseer_cache(tf, dh.TaylorSeerCacheConfig(
                cache_identifiers=[r"transformer_blocks\.\d+"], cache_interval=int(value),
                disable_cache_before_step=3, max_order=1, taylor_factors_dtype=torch.float32))
        elif name == "magcache":
            if mag_ratios is None:
                raise ValueError("magcache needs mag_ratios: run calibrate_magcache(pipe, run, num_steps) first")
            dh.apply_mag_cache(tf, dh.MagCacheConfig(mag_ratios=list(mag_ratios), num_inference_steps=num_steps,
                                                     threshold=float(value), max_skip_steps=3, retention_ratio=0.2))
        reg.invalidate_child_registries_cache()  # the context must reach the hooks just added
    except Exception:
        plumbing.remove()
        restore_streams()
        raise

    def remove():
        plumbing.remove()
        for n in _diffusers_hook_names(name):
            reg.remove_hook(n, recurse=True)
        restore_streams()

    return PeerHandle(name, remove, {"knob": PEERS[name].knob, "value": value})


# joint (two-stream) blocks that can drop their text stream: SD3's last block (``context_pre_only``)
# returns ``None`` for it, which diffusers' first-block cache and TaylorSeer cannot take
_TEXT_STREAM_BLOCKS = {"JointTransformerBlock": "context_pre_only"}
_TEXT_STREAM_HOOK = "ditaccel_text_stream_kept"


def _text_stream_droppers(transformer) -> list[torch.nn.Module]:
    """The blocks of ``transformer`` that return ``None`` for their text stream (``_TEXT_STREAM_BLOCKS``)."""
    return [m for m in transformer.modules()
            if type(m).__name__ in _TEXT_STREAM_BLOCKS and getattr(m, _TEXT_STREAM_BLOCKS[type(m).__name__]) is True]


def _keep_text_streams(transformer) -> Callable[[], None]:
    """On every block of ``transformer`` that drops its text stream (``_TEXT_STREAM_BLOCKS``), a
    diffusers hook that returns the block's text input in place of ``None``.  The transformer
    discards the last block's text output, so its result is unchanged, and diffusers' FBC and
    TaylorSeer hooks (which take a residual or a Taylor state of every output) run on SD3.

    Returns a function that removes the hooks again (a no-op where none was needed).

        restore = _keep_text_streams(pipe.transformer)   # before the peer's own hooks
        ...
        restore()
    """
    from diffusers.hooks import HookRegistry, ModelHook

    class KeepTextStream(ModelHook):
        def new_forward(self, module, *args, **kwargs):
            out = self.fn_ref.original_forward(*args, **kwargs)
            if isinstance(out, tuple) and out[0] is None:
                text = kwargs["encoder_hidden_states"] if "encoder_hidden_states" in kwargs else args[1]
                out = (text, *out[1:])
            return out

    hooked = _text_stream_droppers(transformer)
    for m in hooked:
        HookRegistry.check_if_exists_or_initialize(m).register_hook(KeepTextStream(), _TEXT_STREAM_HOOK)

    def restore() -> None:
        for m in hooked:
            HookRegistry.check_if_exists_or_initialize(m).remove_hook(_TEXT_STREAM_HOOK, recurse=False)
        hooked.clear()

    return restore


# cache-dit's block contract per transformer, for pipelines it does not know by name (ours): the
# pattern its own adapter for that model family uses
_CACHE_DIT_PATTERNS = {"PixArtTransformer2DModel": "Pattern_3", "SD3Transformer2DModel": "Pattern_1"}


def _attach_cache_dit(pipe, name: str, value: float, num_steps: int) -> PeerHandle:
    try:
        import cache_dit
        from cache_dit import (BlockAdapter, BlockAdapterRegister, DBCacheConfig, ForwardPattern,
                               TaylorSeerCalibratorConfig)
    except ImportError as e:
        raise PeerUnavailable(f"{name} needs cache-dit: pip install cache-dit ({e})") from None
    # where the last block drops the text stream (SD3) there is no text residual to forecast: cache-dit's
    # encoder calibrator would look up a state it never stored
    calib = (TaylorSeerCalibratorConfig(taylorseer_order=1,
                                        enable_encoder_calibrator=not _text_stream_droppers(pipe.transformer))
             if name == "dbcache-taylorseer" else None)
    cfg = DBCacheConfig(Fn_compute_blocks=1, Bn_compute_blocks=0, max_warmup_steps=4,
                        residual_diff_threshold=float(value), num_inference_steps=num_steps)
    target = pipe
    if not BlockAdapterRegister.is_supported(pipe):  # cache-dit knows pipelines by class name
        tf = pipe.transformer
        pattern = _CACHE_DIT_PATTERNS.get(type(tf).__name__)
        if pattern is None:
            raise PeerUnavailable(f"cache-dit has no adapter for {type(pipe).__name__} and ditaccel knows no "
                                  f"block pattern for {type(tf).__name__}")
        target = BlockAdapter(pipe=pipe, transformer=tf, blocks=tf.transformer_blocks,
                              forward_pattern=getattr(ForwardPattern, pattern), check_forward_pattern=True)
    tf = pipe.transformer
    # cache-dit's patch functors (DiT's, for one) replace the transformer's forward (an instance
    # attribute, or diffusers' hook-registry wrapper where one is there) and register an alias of
    # one of its submodules as a new child, and disable_cache leaves both: the model's state dict
    # (so its fingerprint, which profiles and plans check) and forward would stay cache-dit's.
    # What enable_cache adds or replaces on the transformer is put back on removal
    attrs, children = dict(vars(tf)), set(tf._modules)
    with contextlib.redirect_stdout(io.StringIO()):
        cache_dit.enable_cache(target, cache_config=cfg, calibrator_config=calib)

    def remove():
        with contextlib.redirect_stdout(io.StringIO()):
            cache_dit.disable_cache(pipe)
        for k in set(tf._modules) - children:
            del tf._modules[k]
        for k in set(vars(tf)) - set(attrs):
            delattr(tf, k)
        for k, v in attrs.items():
            if vars(tf).get(k) is not v:
                setattr(tf, k, v)

    return PeerHandle(name, remove, {"knob": PEERS[name].knob, "value": value})


# the block classes ToMe runs on: tomesd's own patch, and SD3's joint blocks through hooks
TOME_BLOCKS = ("BasicTransformerBlock", "JointTransformerBlock")


def attach_tome(pipe, ratio: float, merge_mlp: bool = True, use_rand: bool = True, seed: int = 0) -> PeerHandle:
    """ToMe-style token merging (tomesd, PyPI ``tomesd``) on ``pipe.transformer``'s blocks: before
    self-attention (and, with ``merge_mlp``, the MLP) each block merges the fraction ``ratio`` of
    its tokens into their most similar neighbours by bipartite soft matching (one destination
    token per 2x2 patch of the token grid), runs the module on the rest and copies the results
    back to the merged tokens.

    tomesd patches diffusers' ``BasicTransformerBlock`` (DiT, PixArt), which is all it supports.
    On SD3's ``JointTransformerBlock`` this uses tomesd's own merge (``tomesd.patch.compute_merge``,
    bipartite soft matching on the block's image tokens) through hooks on the block's joint
    attention and MLP: the image stream is merged on the way in and copied back on the way out,
    the text tokens are left alone (as Shiva leaves them).

    What this adds on either: ToMe on the patch grid (tomesd's ``max_downsample`` set to the patch
    size: it counts the grid from the latent size), the grid read from the call (tomesd's own
    hook reads a positional input only), and the random destination choice re-seeded with
    ``seed`` at the start of every trajectory (tomesd forks the global RNG once), so that runs
    are reproducible.  tomesd's default leaves the MLP alone; here ``merge_mlp`` defaults to True,
    since on a DiT the MLP holds most of a block's FLOPs and merging attention alone barely
    speeds it up."""
    try:
        import tomesd
    except ImportError as e:
        raise PeerUnavailable(f"ToMe needs tomesd: pip install tomesd ({e})") from None
    from .runtime.adapters import find_blocks

    tf = pipe.transformer
    blocks = [b for _, b, _ in find_blocks(tf)]
    kinds = sorted({type(b).__name__ for b in blocks})
    if len(kinds) != 1 or kinds[0] not in TOME_BLOCKS:
        raise ValueError(f"ToMe (tomesd) runs on diffusers' BasicTransformerBlock (DiT, PixArt) and, here, "
                         f"SD3's JointTransformerBlock; {type(tf).__name__} has {', '.join(kinds)}")
    if not 0 <= ratio < 0.75:
        raise ValueError(f"ToMe merges a fraction of the tokens in [0, 0.75) with 2x2 strides, got {ratio}")
    patch = int(tf.config.patch_size)
    if kinds == ["JointTransformerBlock"]:
        if any(b._chunk_size is not None or b.use_dual_attention for b in blocks):
            raise ValueError("ToMe on joint blocks supports neither chunked feed-forward nor SD3.5's dual "
                             "attention layers; turn chunking off (or use a model without dual attention)")
        info = {"args": {"ratio": float(ratio), "max_downsample": patch, "sx": 2, "sy": 2, "use_rand": use_rand,
                         "generator": None, "merge_attn": True, "merge_crossattn": False, "merge_mlp": merge_mlp}}
        handles = _tome_joint_hooks(blocks, info, merge_mlp)
        undo = lambda: [h.remove() for h in handles]  # noqa: E731
    else:
        tomesd.apply_patch(tf, ratio=float(ratio), max_downsample=patch, sx=2, sy=2, use_rand=use_rand,
                           merge_attn=True, merge_crossattn=False, merge_mlp=merge_mlp)
        info = tf._tome_info
        for h in info["hooks"]:  # replaced by a hook that also reads keyword inputs
            h.remove()
        info["hooks"].clear()

        def undo():
            tomesd.remove_patch(tf)
            del tf._tome_info

    def size(module, args, kwargs):
        x = kwargs.get("hidden_states", args[0] if args else None)
        info["size"] = (int(x.shape[-2]), int(x.shape[-1]))

    def reseed():
        info["args"]["generator"] = torch.Generator(device=tf.device).manual_seed(seed)

    handle = tf.register_forward_pre_hook(size, with_kwargs=True)
    plumbing = _Plumbing(tf, context=False, reset=reseed)

    def remove():
        plumbing.remove()
        handle.remove()
        undo()

    return PeerHandle("tome", remove, {"knob": "ratio", "value": ratio, "merge_mlp": merge_mlp})


def _tome_joint_hooks(blocks, info: dict, merge_mlp: bool) -> list:
    """Forward hooks that run ToMe on SD3's joint blocks with tomesd's merge (no patched class):
    each block's pre-hook computes the merge from its image tokens, the joint attention (and the
    MLP) run on the merged image stream, and their image outputs are unmerged to full length."""
    from tomesd.patch import compute_merge

    handles = []
    for block in blocks:
        fns: dict[str, Any] = {}

        def block_pre(module, args, kwargs, fns=fns):
            x = kwargs.get("hidden_states", args[0] if args else None)
            m_a, _, m_m, u_a, _, u_m = compute_merge(x, info)
            fns.update(m_a=m_a, u_a=u_a, m_m=m_m, u_m=u_m)

        def attn_pre(module, args, kwargs, fns=fns):
            if args:
                return (fns["m_a"](args[0]), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": fns["m_a"](kwargs["hidden_states"])}

        def attn_post(module, args, kwargs, output, fns=fns):
            if isinstance(output, tuple):
                return (fns["u_a"](output[0]), *output[1:])
            return fns["u_a"](output)

        handles += [block.register_forward_pre_hook(block_pre, with_kwargs=True),
                    block.attn.register_forward_pre_hook(attn_pre, with_kwargs=True),
                    block.attn.register_forward_hook(attn_post, with_kwargs=True)]
        if merge_mlp:
            handles += [block.ff.register_forward_pre_hook(lambda m, a, fns=fns: (fns["m_m"](a[0]), *a[1:])),
                        block.ff.register_forward_hook(lambda m, a, out, fns=fns: fns["u_m"](out))]
    return handles
