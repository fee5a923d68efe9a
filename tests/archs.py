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


ARCHS = {
    "dit-pixel": dit_pixel,
    "DiTPipeline": dit_diffusers,
    "PixArtAlphaPipeline": pixart,
    "PixArtSigmaPipeline": lambda: pixart(sigma=True),
    "StableDiffusion3Pipeline": sd3,
}
