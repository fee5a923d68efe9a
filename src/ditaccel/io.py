"""Artifacts on disk: safetensors + JSON, written atomically, with a schema version and a fingerprint.

Every artifact ditaccel writes is a pair ``<name>.safetensors`` (tensors) + ``<name>.json``
(metadata), or a single JSON file.  Writes go to a temporary file in the same folder, are
fsync'ed, then renamed over the target, so a reader never sees half a file.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import load_file, save_file

SCHEMA_VERSION = 1


class ArtifactError(ValueError):
    """An artifact is missing, unreadable, of another schema, or for another model."""


def _atomic_replace(path: Path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: str | Path, obj: Any) -> None:
    data = (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()
    _atomic_replace(Path(path), lambda f: f.write(data))


def write_text(path: str | Path, text: str) -> None:
    data = text.encode()
    _atomic_replace(Path(path), lambda f: f.write(data))


def read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: file not found; check the path")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path}: not valid JSON ({e.msg if hasattr(e, 'msg') else e}); "
                            "the file is damaged, regenerate it") from None


def write_tensors(path: str | Path, tensors: Mapping[str, torch.Tensor],
                  metadata: Mapping[str, str] | None = None) -> None:
    from safetensors.torch import save

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    data = save(tensors, metadata=dict(metadata) if metadata else None)
    _atomic_replace(Path(path), lambda f: f.write(data))


def read_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: file not found; check the path")
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises several types for damaged files
        raise ArtifactError(f"{path}: not a readable safetensors file ({e}); "
                            "the file is damaged, regenerate it") from None


def _with(stem: Path, suffix: str) -> Path:
    return stem.with_name(stem.name + suffix)


def save_artifact(stem: str | Path, kind: str, tensors: Mapping[str, torch.Tensor],
                  meta: Mapping[str, Any]) -> None:
    """Write ``stem.safetensors`` then ``stem.json``; the JSON names the tensors' digest."""
    stem = Path(stem)
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    write_tensors(_with(stem, ".safetensors"), tensors)
    full = {"schema_version": SCHEMA_VERSION, "kind": kind,
            "tensors_sha256": tensors_digest(tensors), **meta}
    write_json(_with(stem, ".json"), full)


def load_artifact(stem: str | Path, kind: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    stem = Path(stem)
    meta = read_json(_with(stem, ".json"))
    if not isinstance(meta, dict) or meta.get("kind") != kind:
        raise ArtifactError(f"{stem}.json: not a {kind} artifact; pass the right file")
    if meta.get("schema_version") != SCHEMA_VERSION:
        raise ArtifactError(f"{stem}.json: schema version {meta.get('schema_version')} is not "
                            f"{SCHEMA_VERSION}; regenerate it with this version of ditaccel")
    tensors = read_tensors(_with(stem, ".safetensors"))
    if tensors_digest(tensors) != meta.get("tensors_sha256"):
        raise ArtifactError(f"{stem}: tensors do not match their metadata (interrupted or mixed "
                            "write); regenerate it")
    return tensors, meta


def tensors_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach().contiguous().cpu()
        h.update(k.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def optimizer_tensors(opt: torch.optim.Optimizer, prefix: str = "opt.") -> tuple[dict[str, torch.Tensor], list[dict]]:
    """An optimizer's state as named tensors (``prefix`` + ``<param index>.<name>``) and its
    param groups (JSON-able): what a safetensors checkpoint holds of it."""
    state = opt.state_dict()
    tensors = {f"{prefix}{i}.{name}": (v if torch.is_tensor(v) else torch.tensor(v))
               for i, s in state["state"].items() for name, v in s.items()}
    return tensors, [dict(g) for g in state["param_groups"]]


def load_optimizer(opt: torch.optim.Optimizer, tensors: Mapping[str, torch.Tensor], groups: list[dict],
                   prefix: str = "opt.") -> None:
    """Inverse of :func:`optimizer_tensors`."""
    state: dict = {}
    for k, v in tensors.items():
        if k.startswith(prefix):
            i, name = k[len(prefix):].split(".", 1)
            state.setdefault(int(i), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": groups})


def model_fingerprint(model: torch.nn.Module) -> str:
    """A short digest of a model's class, config and weights: artifacts carry it to refuse a
    profile or plan made for another model."""
    h = hashlib.sha256(type(model).__name__.encode())
    config = getattr(model, "config", None)
    if config is not None:
        # private keys (_name_or_path, _diffusers_version, ...) say where and how it was saved, not what it is
        public = {k: v for k, v in dict(config).items() if not k.startswith("_")}
        h.update(json.dumps(public, sort_keys=True, default=str).encode())
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(p.shape)).encode())
        # A strided sample of each tensor keeps this fast on multi-GB models.
        flat = p.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 4096)].float().cpu()
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]
