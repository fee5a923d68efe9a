"""Shiva (learned static-budget token routing): under construction, not exported yet.

Built so far: :mod:`.topk` (the residual-based differentiable top-k), :mod:`.router` (the
context-aware router), :mod:`.policy` (the adaptive keep-ratio policy), :mod:`.routing` (routing
during training), :mod:`.train` (the three-stage training, checkpoints, the artifact) and
:mod:`.inference` (running an artifact on a pipeline).  ``ditaccel train-shiva`` and
``ditaccel generate --shiva`` drive them.
"""
