"""ditaccel: faster Diffusion Transformer sampling on unmodified diffusers pipelines."""

from .pipeline import DiTPixelPipeline, make_scheduler
from .registry import load_pipeline
from .sampling import RunStats, sample

__all__ = ["DiTPixelPipeline", "make_scheduler", "load_pipeline", "sample", "RunStats"]
__version__ = "0.1.0"
