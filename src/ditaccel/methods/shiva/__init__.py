"""Shiva: learned static-budget token routing (the Shiva-DiT paper).

:mod:`.topk` (the residual-based differentiable top-k), :mod:`.router` (the context-aware
router), :mod:`.policy` (the adaptive keep-ratio policy and budget), :mod:`.routing` (routing
during training), :mod:`.train` (the three-stage training, checkpoints, the artifact) and
:mod:`.inference` (running an artifact on a pipeline).  ``ditaccel train-shiva`` and
``ditaccel generate --shiva`` drive them.
"""

from .inference import ShivaArtifact, apply_shiva, load_shiva, remove_shiva, shiva_plan
from .train import ShivaTrainConfig, train_shiva

__all__ = ["ShivaArtifact", "apply_shiva", "load_shiva", "remove_shiva", "shiva_plan", "ShivaTrainConfig",
           "train_shiva"]
