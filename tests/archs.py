"""Tiny random diffusers pipelines of every supported architecture, and one way to call each:
the shared tester runs every runtime test on all of them."""

from __future__ import annotations

import torch


def _vae(latent_channels: int = 4, **extra):
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels,
                         block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4, sample_size=16,
                         **extra)


def dit_pixel():
    from diffusers import DDIMScheduler

    from ditaccel.models.reference import NOISE_SCHEDULE
    from ditaccel.pipeline import DiTPixelPipeline
    from tests.conftest import tiny_dit

    pipe = DiTPixelPipeline(transformer=tiny_dit(), scheduler=DDIMScheduler(**NOISE_SCHEDULE))

    def call(pipe, batch, seed, steps):
        gens = [torch.Generator().manual_seed(seed + i) for i in range(batch)]
        return pipe(class_labels=[(seed + i) % 4 for i in range(batch)], guidance_scale=2.0, generator=gens,
                    num_inference_steps=steps, output_type="pt").images
    return pipe, call


def dit_diffusers():
    from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(0)
    tf = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
                               out_channels=8, num_layers=2, sample_size=4, patch_size=2,
                               num_embeds_ada_norm=1000, norm_type="ada_norm_zero")
    pipe = DiTPipeline(transformer=tf.eval(), vae=_vae().eval(), scheduler=DDIMScheduler())

    def call(pipe, batch, seed, steps):
        gens = [torch.Generator().manual_seed(seed + i) for i in range(batch)]
        return pipe(class_labels=[(7 * (seed + i)) % 1000 for i in range(batch)], guidance_scale=2.0,
                    generator=gens, num_inference_steps=steps, output_type="np").images
    return pipe, call


def pixart(sigma: bool = False):
    from diffusers import DDIMScheduler, PixArtAlphaPipeline, PixArtSigmaPipeline, PixArtTransformer2DModel

    torch.manual_seed(0)
    tf = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                  out_channels=8, num_layers=2, sample_size=4, patch_size=2,
                                  cross_attention_dim=16, caption_channels=12,
                                  num_embeds_ada_norm=1000, norm_type="ada_norm_single")
    cls = PixArtSigmaPipeline if sigma else PixArtAlphaPipeline
    pipe = cls(tokenizer=None, text_encoder=None, vae=_vae().eval(), transformer=tf.eval(),
               scheduler=DDIMScheduler())
    g = torch.Generator().manual_seed(123)
    text = torch.randn(8, 5, 12, generator=g)  # 8 fixed "prompts" of 5 tokens

    def call(pipe, batch, seed, steps):
        gens = [torch.Generator().manual_seed(seed + i) for i in range(batch)]
        emb = text[[(seed + i) % 8 for i in range(batch)]]  # image i depends on seed + i only
        mask = torch.ones(emb.shape[:2], dtype=torch.long)
        return pipe(prompt=None, negative_prompt=None, prompt_embeds=emb, prompt_attention_mask=mask,
                    negative_prompt_embeds=torch.zeros_like(emb), negative_prompt_attention_mask=mask,
                    guidance_scale=2.0, generator=gens, num_inference_steps=steps, height=8, width=8,
                    use_resolution_binning=False, output_type="np").images
    return pipe, call


def sd3():
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(0)
    tf = SD3Transformer2DModel(sample_size=4, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                               attention_head_dim=8, num_attention_heads=2, joint_attention_dim=12,
                               caption_projection_dim=16, pooled_projection_dim=10, pos_embed_max_size=8)
    pipe = StableDiffusion3Pipeline(transformer=tf.eval(), scheduler=FlowMatchEulerDiscreteScheduler(),
                                    vae=_vae(shift_factor=0.0).eval(), text_encoder=None, tokenizer=None,
                                    text_encoder_2=None, tokenizer_2=None, text_encoder_3=None,
                                    tokenizer_3=None)
    g = torch.Generator().manual_seed(123)
    text, pooled = torch.randn(8, 6, 12, generator=g), torch.randn(8, 10, generator=g)

    def call(pipe, batch, seed, steps):
        gens = [torch.Generator().manual_seed(seed + i) for i in range(batch)]
        sel = [(seed + i) % 8 for i in range(batch)]
        return pipe(prompt_embeds=text[sel], pooled_prompt_embeds=pooled[sel],
                    negative_prompt_embeds=torch.zeros_like(text[sel]),
                    negative_pooled_prompt_embeds=torch.zeros_like(pooled[sel]), guidance_scale=2.0,
                    generator=gens, num_inference_steps=steps, height=8, width=8,
                    output_type="np").images
    return pipe, call


def flux():
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(0)
    # in_channels = 4 latent channels * 2x2 packing; head dim 8 = sum(axes_dims_rope)
    tf = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2,
                                attention_head_dim=8, num_attention_heads=2, joint_attention_dim=12,
                                pooled_projection_dim=10, guidance_embeds=False, axes_dims_rope=(2, 2, 4))
    pipe = FluxPipeline(transformer=tf.eval(), vae=_vae(shift_factor=0.1, scaling_factor=0.5).eval(),
                        scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True),
                        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None)
    g = torch.Generator().manual_seed(123)
    text, pooled = torch.randn(8, 6, 12, generator=g), torch.randn(8, 10, generator=g)
    neg_text, neg_pooled = torch.randn(6, 12, generator=g), torch.randn(10, generator=g)

    def call(pipe, batch, seed, steps):
        gens = [torch.Generator().manual_seed(seed + i) for i in range(batch)]
        sel = [(seed + i) % 8 for i in range(batch)]
        # true CFG: the transformer runs twice per step (cond, then uncond), batch `batch` each time
        return pipe(prompt_embeds=text[sel], pooled_prompt_embeds=pooled[sel],
                    negative_prompt_embeds=neg_text.repeat(batch, 1, 1),
                    negative_pooled_prompt_embeds=neg_pooled.repeat(batch, 1), true_cfg_scale=2.0,
                    generator=gens, num_inference_steps=steps, height=16, width=16,
                    output_type="np").images
    return pipe, call


def wan():
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

    torch.manual_seed(0)
    # head dim 12: rope splits it into t/h/w = 4/4/4
    tf = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                               in_channels=4, out_channels=4, text_dim=16, freq_dim=32, ffn_dim=32,
                               num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                               rope_max_seq_len=32)
    vae = AutoencoderKLWan(base_dim=3, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True], latents_mean=[0.1, -0.2, 0.0, 0.3],
                           latents_std=[1.5, 0.8, 1.0, 2.0])
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=vae.eval(), transformer=tf.eval(),
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
    g = torch.Generator().manual_seed(123)
    text, neg = torch.randn(8, 7, 16, generator=g), torch.randn(7, 16, generator=g)

    def call(pipe, batch, seed, steps):
        gens = [torch.Generator().manual_seed(seed + i) for i in range(batch)]
        sel = [(seed + i) % 8 for i in range(batch)]
        # CFG: the transformer runs twice per step (cond, then uncond); 5 frames -> 2 latent frames,
        # 32x32 px -> 4x4 latents -> 2x2 patches: 8 video tokens
        return pipe(prompt_embeds=text[sel], negative_prompt_embeds=neg.repeat(batch, 1, 1),
                    guidance_scale=2.0, generator=gens, num_inference_steps=steps, height=32, width=32,
                    num_frames=5, output_type="np").frames
    return pipe, call


ARCHS = {
    "dit-pixel": dit_pixel,
    "DiTPipeline": dit_diffusers,
    "PixArtAlphaPipeline": pixart,
    "PixArtSigmaPipeline": lambda: pixart(sigma=True),
    "StableDiffusion3Pipeline": sd3,
    "FluxPipeline": flux,
    "WanPipeline": wan,
}

# Image tokens per sample at the size each `call` samples at, where the model has no default size.
TOKENS = {"FluxPipeline": 16, "WanPipeline": 8}
