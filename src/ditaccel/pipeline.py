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
                       DPMSolverMultistepScheduler, ImagePipelineOutput)
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

# sampler name -> (scheduler class, extra config, default number of steps)
SAMPLERS: dict[str, tuple[type, dict, int]] = {
    "ddim": (DDIMScheduler, {}, 50),
    "ddpm": (DDPMScheduler, {}, 250),
    "dpm++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}, 20),
}


def make_scheduler(sampler: str, base_config) -> object:
    """A diffusers scheduler of the named kind sharing ``base_config``'s noise schedule."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
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
        for t in self.progress_bar(self.scheduler.timesteps):
            x = torch.cat([sample, sample]) if use_cfg else sample
            x = self.scheduler.scale_model_input(x, t)
            timesteps = t.expand(x.shape[0]).to(x.device)
            out = tf(x.to(tf.dtype), timestep=timesteps, class_labels=labels_in).sample.float()
            if out.shape[1] == 2 * channels:  # learned variance (DiT-XL/2): keep epsilon only
                out = out[:, :channels]
            if use_cfg:
                cond, uncond = out.chunk(2)
                out = uncond + guidance_scale * (cond - uncond)
            sample = self.scheduler.step(out, t, sample, generator=generator).prev_sample

        images = (sample / 2 + 0.5).clamp(0, 1)
        self.maybe_free_model_hooks()
        if output_type == "pt":
            result = images
        else:
            arr = images.permute(0, 2, 3, 1).cpu().numpy()
            result = arr if output_type == "np" else numpy_to_pil(arr)
        if not return_dict:
            return (result,)
        return ImagePipelineOutput(images=result)


def numpy_to_pil(arr: np.ndarray) -> list[Image.Image]:
    arr = (arr * 255).round().astype(np.uint8)
    if arr.shape[-1] == 1:
        return [Image.fromarray(a[..., 0], mode="L") for a in arr]
    return [Image.fromarray(a) for a in arr]
