"""Shiva (learned static-budget token routing): under construction, not exported yet.

Built so far: :mod:`.topk` (the residual-based differentiable top-k), :mod:`.router` (the
context-aware router), :mod:`.policy` (the adaptive keep-ratio policy) and :mod:`.routing`.
"""
