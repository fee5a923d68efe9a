"""Peer caching methods attached with their plumbing: they skip work, change the output, reset
between runs, survive a batch change, and come off cleanly."""

import pytest
import torch
from diffusers import DDIMScheduler, DiTTransformer2DModel

from ditaccel.models.reference import NOISE_SCHEDULE
from ditaccel.peers import PEERS, attach_peer, calibrate_magcache
from ditaccel.pipeline import DiTPixelPipeline
from ditaccel.sampling import sample

STEPS = 20
AGGRESSIVE = {"fbc": 0.5, "pab": 3, "fastercache": 2, "taylorseer": 3, "magcache": 0.24, "dbcache": 0.5,
              "dbcache-taylorseer": 0.5}


@pytest.fixture(scope="module")
def pipe():
    torch.manual_seed(0)
    tf = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=1, out_channels=1,
                               num_layers=4, sample_size=8, patch_size=2, num_embeds_ada_norm=4,
                               norm_type="ada_norm_zero").eval()
    with torch.no_grad():  # diffusers zero-initialises the gates: make the blocks do something
        for p in tf.parameters():
            p.add_(0.02 * torch.randn_like(p))
    p = DiTPixelPipeline(transformer=tf, scheduler=DDIMScheduler(**NOISE_SCHEDULE))
    p.set_progress_bar_config(disable=True)
    return p


def _run(pipe, labels=(0, 1), seed=0):
    return sample(pipe, list(labels), steps=STEPS, guidance_scale=2.0, seed=seed, progress=False,
                  count_flops=False)[0]


def _attn_calls(pipe):
    calls = []
    handles = [b.attn1.to_q.register_forward_hook(lambda *a: calls.append(1)) for b in pipe.transformer.transformer_blocks]
    return calls, handles


def test_every_peer_has_a_knob_and_a_sweep():
    for peer in PEERS.values():
        assert peer.library in ("diffusers", "cache-dit") and peer.knob and len(peer.sweep) >= 3
        assert list(peer.sweep) == sorted(peer.sweep)


@pytest.mark.parametrize("name", sorted(PEERS))
def test_peer_skips_work_resets_between_runs_and_comes_off(pipe, name):
    if PEERS[name].library == "cache-dit":
        pytest.importorskip("cache_dit")
    full = _run(pipe)
    calls, handles = _attn_calls(pipe)
    _run(pipe)
    full_calls = len(calls)
    ratios = None
    if PEERS[name].needs_calibration:
        ratios = calibrate_magcache(pipe, lambda p: _run(p, labels=(2, 3), seed=9), STEPS)
        assert len(ratios) == STEPS and ratios[0] == 1.0
        torch.testing.assert_close(_run(pipe), full, atol=0, rtol=0)  # calibration leaves nothing behind
    from ditaccel.io import model_fingerprint

    fingerprint, children = model_fingerprint(pipe.transformer), set(pipe.transformer._modules)
    handle = attach_peer(pipe, name, AGGRESSIVE[name], STEPS, mag_ratios=ratios)
    try:
        calls.clear()
        first = _run(pipe)
        assert len(calls) < full_calls, f"{name} skipped no attention call"
        assert not torch.equal(first, full)
        assert torch.equal(_run(pipe), first), f"{name} leaks state from one run into the next"
        _run(pipe, labels=(0, 1, 2))  # another batch size starts clean
        assert torch.equal(_run(pipe), first)
    finally:
        handle.remove()
        for h in handles:
            h.remove()
    assert torch.equal(_run(pipe), full)
    # nothing left on the model (cache-dit's patch left an instance forward and an aliased child,
    # which changed the fingerprint that profiles and plans made afterwards carried)
    assert model_fingerprint(pipe.transformer) == fingerprint
    assert set(pipe.transformer._modules) == children
    forward = vars(pipe.transformer).get("forward")  # diffusers' hook registry keeps its own wrapper
    assert forward is None or not getattr(forward, "__module__", "").startswith("cache_dit")


def test_cache_dit_comes_off_after_a_diffusers_hook():
    # diffusers' hook registry leaves its own forward wrapper on the model; cache-dit's patch then
    # replaces that attribute rather than adding one, and must still be undone
    pytest.importorskip("cache_dit")
    from ditaccel.io import model_fingerprint

    p = _fresh_pipe()
    with torch.no_grad():  # as the module's pipe: blocks that do something
        for w in p.transformer.parameters():
            w.add_(0.02 * torch.randn_like(w))
    full = _run(p)
    attach_peer(p, "fastercache", 2, STEPS).remove()  # its denoiser hook wraps the transformer's forward
    fingerprint, forward = model_fingerprint(p.transformer), vars(p.transformer).get("forward")
    h = attach_peer(p, "dbcache", AGGRESSIVE["dbcache"], STEPS)
    assert not torch.equal(_run(p), full)
    h.remove()
    assert vars(p.transformer).get("forward") is forward
    assert model_fingerprint(p.transformer) == fingerprint
    assert torch.equal(_run(p), full)
    attach_peer(p, "dbcache", AGGRESSIVE["dbcache"], STEPS).remove()  # and it attaches again
    assert torch.equal(_run(p), full)


def test_unknown_peer_and_missing_ratios_are_refused(pipe):
    with pytest.raises(ValueError, match="unknown peer"):
        attach_peer(pipe, "nope", 1, STEPS)
    with pytest.raises(ValueError, match="calibrate_magcache"):
        attach_peer(pipe, "magcache", 0.1, STEPS)
    full = _run(pipe)
    assert torch.equal(_run(pipe), full)  # a refused attach leaves nothing behind


def test_tome_merges_tokens_reproducibly_and_comes_off():
    from ditaccel.peers import attach_tome

    ref = _run(pipe_ := _fresh_pipe())
    seen = []
    hooks = [b.attn1.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[1]))
             for b in pipe_.transformer.transformer_blocks]
    h = attach_tome(pipe_, 0.0)
    assert torch.equal(_run(pipe_), ref), "ratio 0 merges nothing"
    h.remove()
    # a block-level hook of ours on and off first: tomesd's class patch must still take effect
    from ditaccel.methods import model_shape
    from ditaccel.methods.shiva.policy import plan_from_ratios
    from ditaccel.runtime import apply, remove

    shape = model_shape(pipe_.transformer, STEPS)
    apply(pipe_, plan_from_ratios(torch.full((STEPS, 2), 0.5, dtype=torch.float64), 16, shape.modules, 4),
          router=lambda x, call: x.norm(dim=-1))
    _run(pipe_)
    remove(pipe_)
    seen.clear()
    h = attach_tome(pipe_, 0.5, seed=3)
    merged = _run(pipe_)
    assert set(seen) == {16 - 8}, "each block's attention runs on the 8 tokens left after merging half of 16"
    assert not torch.allclose(merged, ref) and torch.isfinite(merged).all()
    assert torch.equal(_run(pipe_), merged), "the random destinations are re-seeded every trajectory"
    h.remove()
    assert torch.equal(_run(pipe_), ref), "removing ToMe restores the model"
    for hk in hooks:
        hk.remove()
    with pytest.raises(ValueError, match=r"\[0, 0.75\)"):
        attach_tome(pipe_, 0.8)


def test_tome_on_joint_blocks_merges_image_tokens_only_and_comes_off():
    import numpy as np

    from ditaccel.peers import attach_tome
    from tests.archs import ARCHS

    sd3, call = ARCHS["StableDiffusion3Pipeline"]()
    ref = call(sd3, 2, 0, 4)
    h = attach_tome(sd3, 0.0)
    assert np.array_equal(call(sd3, 2, 0, 4), ref), "ratio 0 merges nothing"
    h.remove()
    h = attach_tome(sd3, 0.5, seed=1)
    seen = []
    blocks = sd3.transformer.transformer_blocks
    hooks = [b.attn.register_forward_pre_hook(
        lambda m, a, k: seen.append((k["hidden_states"].shape[1], k["encoder_hidden_states"].shape[1])),
        with_kwargs=True) for b in blocks]
    hooks += [b.ff.register_forward_pre_hook(lambda m, a: seen.append(("ff", a[0].shape[1]))) for b in blocks]
    merged = call(sd3, 2, 0, 4)
    # 2x2 image tokens, half merged away, before the joint attention and the MLP; 6 text tokens kept
    assert set(seen) == {(2, 6), ("ff", 2)}
    assert not np.allclose(merged, ref) and np.isfinite(merged).all()
    assert np.array_equal(call(sd3, 2, 0, 4), merged), "the random destinations are re-seeded every trajectory"
    for hk in hooks:
        hk.remove()
    h.remove()
    assert np.array_equal(call(sd3, 2, 0, 4), ref), "removing ToMe restores the model"


def test_tome_refuses_blocks_it_cannot_merge():
    from ditaccel.peers import attach_tome
    from tests.archs import ARCHS

    flux, _ = ARCHS["FluxPipeline"]()
    with pytest.raises(ValueError, match="JointTransformerBlock; FluxTransformer2DModel has"):
        attach_tome(flux, 0.3)


def _fresh_pipe():
    torch.manual_seed(0)
    tf = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=1, out_channels=1,
                               num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=4,
                               norm_type="ada_norm_zero").eval()
    with torch.no_grad():
        for p in tf.parameters():
            p.add_(0.02 * torch.randn_like(p))
    p = DiTPixelPipeline(transformer=tf, scheduler=DDIMScheduler(**NOISE_SCHEDULE))
    p.set_progress_bar_config(disable=True)
    return p
