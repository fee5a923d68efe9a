"""ditaccel: faster Diffusion Transformer sampling on unmodified diffusers pipelines."""

from .methods import METHODS, ModelShape, make_plan, model_shape
from .methods.shiva import ShivaTrainConfig, apply_shiva, load_shiva, remove_shiva, train_shiva
from .methods.soda import calibrate_soda, plan_soda
from .pipeline import DiTPixelPipeline, TextPixelPipeline, default_sampler, make_scheduler
from .plan import FULL, REUSE, Plan, PlanError, full_plan
from .profiling import Profile, ProfileConfig, ProfileError, profile
from .registry import load_pipeline
from .runtime import apply, remove, state_of
from .runtime.adapters import BLOCKS, UnsupportedModel
from .runtime.hooks import RouteCall
from .runtime.state import PlanMismatch
from .sampling import RunStats, sample

__all__ = ["DiTPixelPipeline", "TextPixelPipeline", "make_scheduler", "default_sampler", "load_pipeline", "sample", "RunStats",
           "Plan", "PlanError", "full_plan", "FULL", "REUSE", "make_plan", "model_shape", "ModelShape",
           "METHODS", "apply", "remove", "state_of", "RouteCall", "PlanMismatch", "UnsupportedModel",
           "BLOCKS", "Profile", "ProfileConfig", "ProfileError", "profile", "plan_soda", "calibrate_soda",
           "apply_shiva", "remove_shiva", "load_shiva", "train_shiva", "ShivaTrainConfig"]
__version__ = "0.1.0"
