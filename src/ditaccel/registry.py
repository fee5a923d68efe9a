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
        "train": "ditaccel train-text-reference --preset fmnist-pixart --steps 1600",
    },
    "fmnist-mmdit": {
        "folder": "fmnist-mmdit",
        "about": "text-to-image SD3-style MMDiT (joint attention with MiniLM-L6 tokens, pooled text in "
                 "adaLN, rectified flow), 28x28x1 pixels, 196 tokens, 8 layers, captioned Fashion-MNIST",
        "class_names": CLASS_NAMES,
        "train": "ditaccel train-text-reference --preset fmnist-mmdit --steps 700",
    },
}
CLASSIFIER_STEM = ASSETS / "fmnist-classifier"

DTYPES = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def native_bf16(device: torch.device | str | None = None) -> bool:
    """Whether bf16 matrix work is fast on ``device`` (default: anywhere here): a CUDA device, or a
    CPU with AMX tiles or AVX512-BF16 (elsewhere the CPU emulates bf16, several times slower than
    fp32)."""
    kind = torch.device(device).type if device is not None else None
    if kind == "cuda" or (kind is None and torch.cuda.is_available()):
        return True
    if getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)():
        return True
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and "avx512_bf16" in line.split() for line in f)
    except OSError:
        return False


def resolve_dtype(name: str, device: torch.device | str | None = None) -> str:
    """``auto`` -> ``bf16`` where :func:`native_bf16` (on ``device``, if given), else ``fp32``;
    other names unchanged."""
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return ("bf16" if native_bf16(device) else "fp32") if name == "auto" else name


class ModelNotFound(ValueError):
    pass


PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle"}


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


def load_pipeline(model: str, dtype: str = "fp32", device: torch.device | str | None = None):
    """Load a pipeline the way a diffusers user would: our pixel DiT pipeline for folders saved
    by it, ``DiffusionPipeline.from_pretrained`` (e.g. ``DiTPipeline``) for anything else.
    ``device``: move it there (:func:`ditaccel.devices.resolve_device`; default: leave it where
    diffusers loads it, the CPU).

    Example::

        pipe = ditaccel.load_pipeline("fmnist-dit", dtype="fp32")
        images = pipe(class_labels=[0, 7], num_inference_steps=20).images
    """
    from diffusers import DiffusionPipeline
    from diffusers.utils import logging as dlogging

    from .pipeline import DiTPixelPipeline, TextPixelPipeline

    from .devices import resolve_device

    target = resolve_device(device) if device is not None else None
    dtype = resolve_dtype(dtype, target)
    path = resolve_model(model)
    try:
        index = json.loads((path / "model_index.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ModelNotFound(f"{path}/model_index.json is not valid JSON; the folder is damaged, "
                            "save the pipeline again") from None
    if not isinstance(index, dict) or "_class_name" not in index:
        raise ModelNotFound(f"{path}/model_index.json has no _class_name; it is not a diffusers "
                            "pipeline index, pass the folder save_pretrained produced")
    ours = {c.__name__: c for c in (DiTPixelPipeline, TextPixelPipeline)}
    cls = ours.get(index["_class_name"], DiffusionPipeline)
    dlogging.disable_progress_bar()  # a loading bar for two components is noise on the CLI
    try:
        # safetensors only: a .bin (pickle) checkpoint could run code when loaded
        pipe = cls.from_pretrained(str(path), dtype=DTYPES[dtype], use_safetensors=True)
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
        if any(p.suffix in PICKLE_SUFFIXES for p in path.rglob("*")):
            raise ModelNotFound(f"{path}: has pickled weights (.bin/.pt/.ckpt), which ditaccel "
                                "does not load because unpickling can run code; re-save the "
                                "pipeline with save_pretrained(..., safe_serialization=True)") from None
        raise ModelNotFound(f"{path}: diffusers could not load it ({_first_line(e)}); pass a "
                            "folder that save_pretrained produced") from None
    finally:
        dlogging.enable_progress_bar()
    transformer = getattr(pipe, "transformer", None)
    if not isinstance(transformer, torch.nn.Module):
        parts = ", ".join(f"{k}: {type(v).__name__}" for k, v in pipe.components.items() if v is not None)
        raise ModelNotFound(f"{path}: {type(pipe).__name__} has no transformer ({parts}); ditaccel "
                            "accelerates diffusion transformers (DiT, PixArt, SD3, Flux, ...)")
    from .runtime.adapters import find_blocks

    find_blocks(transformer)  # an unsupported block class is refused here, with the supported ones
    pipe.set_progress_bar_config(disable=True)
    if target is not None:
        pipe.to(target)
    return pipe


def _first_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text[:240] + ("..." if len(text) > 240 else "")


def load_classifier_asset():
    from .models.classifier import load_classifier

    return load_classifier(CLASSIFIER_STEM)
