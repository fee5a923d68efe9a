"""Bundled assets (models shipped inside the package) and how a model name becomes a pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .data import CLASS_NAMES

ASSETS = Path(__file__).parent / "assets"

# name -> folder under assets/ and what the model is
BUNDLED: dict[str, dict] = {
    "fmnist-dit": {
        "folder": "fmnist-dit",
        "about": "class-conditional DiT (adaLN-Zero), 28x28x1 pixels, 196 tokens, 8 layers, "
                 "Fashion-MNIST",
        "class_names": CLASS_NAMES,
        "train": "ditaccel train-reference",
    },
    "fmnist-pixart": {
        "folder": "fmnist-pixart",
        "about": "text-to-image PixArt-style DiT (adaLN-single, cross-attention to MiniLM-L6 tokens), "
                 "28x28x1 pixels, 196 tokens, 8 layers, captioned Fashion-MNIST",
        "class_names": CLASS_NAMES,
        "train": "ditaccel train-text-reference --preset fmnist-pixart",
    },
}
CLASSIFIER_STEM = ASSETS / "fmnist-classifier"

DTYPES = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def native_bf16() -> bool:
    """Whether bf16 matrix work is fast here: a CUDA device, or a CPU with AMX tiles or
    AVX512-BF16 (elsewhere the CPU emulates bf16, several times slower than fp32)."""
    if torch.cuda.is_available():
        return True
    if getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)():
        return True
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and "avx512_bf16" in line.split() for line in f)
    except OSError:
        return False


def resolve_dtype(name: str) -> str:
    """``auto`` -> ``bf16`` where :func:`native_bf16`, else ``fp32``; other names unchanged."""
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return ("bf16" if native_bf16() else "fp32") if name == "auto" else name


class ModelNotFound(ValueError):
    pass


def resolve_model(model: str) -> Path:
    """A bundled name or a local diffusers pipeline folder -> the folder."""
    if model in BUNDLED:
        path = ASSETS / BUNDLED[model]["folder"]
        if not (path / "model_index.json").is_file():
            raise ModelNotFound(f"bundled model {model!r} is missing from {path}; reinstall "
                                f"ditaccel or train it: `{BUNDLED[model]['train']}`")
        return path
    path = Path(model)
    if not path.exists():
        raise ModelNotFound(f"model {model!r} is neither a bundled model ({', '.join(BUNDLED)}) "
                            "nor an existing folder")
    if not (path / "model_index.json").is_file():
        raise ModelNotFound(f"{path} is not a diffusers pipeline folder (no model_index.json); "
                            "pass the folder that save_pretrained/snapshot_download produced")
    return path


def load_pipeline(model: str, dtype: str = "fp32"):
    """Load a pipeline the way a diffusers user would: our pixel DiT pipeline for folders saved
    by it, ``DiffusionPipeline.from_pretrained`` (e.g. ``DiTPipeline``) for anything else."""
    from diffusers import DiffusionPipeline
    from diffusers.utils import logging as dlogging

    from .pipeline import DiTPixelPipeline, TextPixelPipeline

    dtype = resolve_dtype(dtype)
    path = resolve_model(model)
    index = json.loads((path / "model_index.json").read_text())
    ours = {c.__name__: c for c in (DiTPixelPipeline, TextPixelPipeline)}
    cls = ours.get(index.get("_class_name"), DiffusionPipeline)
    dlogging.disable_progress_bar()  # a loading bar for two components is noise on the CLI
    try:
        pipe = cls.from_pretrained(str(path), dtype=DTYPES[dtype])
    finally:
        dlogging.enable_progress_bar()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_classifier_asset():
    from .models.classifier import load_classifier

    return load_classifier(CLASSIFIER_STEM)
