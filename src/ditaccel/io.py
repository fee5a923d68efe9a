"""Artifacts on disk: safetensors + JSON, written atomically, with a schema version and a fingerprint.

Every artifact ditaccel writes is a pair ``<name>.safetensors`` (tensors) + ``<name>.json``
(metadata), or a single JSON file.  Writes go to a temporary file in the same folder, are
fsync'ed, then renamed over the target, so a reader never sees half a file.

A pair is two files, and two renames are not one atomic step, so the safetensors file carries the
metadata as well (in its header, key ``ditaccel``): it is the artifact, and the JSON beside it is a
copy for people and tools to read.  A writer killed between the two renames leaves the new
artifact whole (the JSON copy is one version behind until the next write); a writer killed
earlier leaves the old one whole.  Artifacts written before the header copy existed load from
their JSON file, checked against the tensors' digest.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import load_file, save_file

SCHEMA_VERSION = 1


class ArtifactError(ValueError):
    """An artifact is missing, unreadable, of another schema, or for another model."""


META_KEY = "ditaccel"


def _tmp_prefix(path: Path) -> str:
    return f".{path.name}.{os.getpid()}."


def _remove_stale_temps(path: Path) -> None:
    """Delete temporary files that a killed writer of ``path`` left behind (its pid is gone)."""
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.(\d+)\..*\.tmp$")
    for other in path.parent.glob(f".{path.name}.*.tmp"):
        m = pattern.match(other.name)
        if m and not _pid_alive(int(m.group(1))):
            other.unlink(missing_ok=True)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _atomic_replace(path: Path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(path)
    fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(path), suffix=".tmp", dir=path.parent)
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


def check_writable(path: str | Path, *, folder: bool = False, flag: str = "--out") -> None:
    """Refuse, before any work is done, an output path that cannot be written: a file where a
    folder is needed (or the reverse), or a folder nobody may write into.  Creates nothing."""
    path = Path(path)
    if path.exists() and folder != path.is_dir():
        kind, want = ("a file", "a folder") if folder else ("a folder", "a file")
        raise ArtifactError(f"cannot write {flag} {path}: it is {kind}, not {want}; choose another path")
    anc = path if path.is_dir() else path.parent
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir():
        raise ArtifactError(f"cannot write {flag} {path}: {anc} is a file, not a folder; choose another path")
    try:
        fd, probe = tempfile.mkstemp(prefix=".ditaccel-write-test.", dir=anc)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ArtifactError(f"cannot write {flag} {path}: {anc} is not writable ({e.strerror}); "
                            "choose another path") from None


def strict_json(obj: Any) -> Any:
    """``obj`` with every non-finite float (NaN, inf, which JSON cannot hold) replaced by None,
    so that ``json.dumps(..., allow_nan=False)`` writes strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    return obj


def write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as strict JSON (non-finite floats become ``null``), atomically."""
    data = (json.dumps(strict_json(obj), indent=2, sort_keys=True, allow_nan=False) + "\n").encode()
    _atomic_replace(Path(path), lambda f: f.write(data))


def write_text(path: str | Path, text: str) -> None:
    data = text.encode()
    _atomic_replace(Path(path), lambda f: f.write(data))


MAX_JSON_BYTES = 64 * 2 ** 20  # a plan for 1000 steps x 100 layers is about 2 MB


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def read_json(path: str | Path, max_bytes: int = MAX_JSON_BYTES) -> Any:
    """The strict JSON document at ``path`` (no NaN or Infinity), at most ``max_bytes`` long;
    an :class:`ArtifactError` with one line saying what is wrong otherwise."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: file not found; check the path")
    size = path.stat().st_size
    if size > max_bytes:
        raise ArtifactError(f"{path}: {size / 2 ** 20:.0f} MiB is too large for a ditaccel JSON file "
                            f"(at most {max_bytes / 2 ** 20:.0f} MiB); pass the right file")
    try:
        return json.loads(path.read_text(), parse_constant=_no_constant)
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as e:
        raise ArtifactError(f"{path}: not valid JSON ({e.msg if hasattr(e, 'msg') else e}); "
                            "the file is damaged, regenerate it") from None
    except RecursionError:
        raise ArtifactError(f"{path}: not valid JSON for ditaccel (nested too deeply); the file is damaged, "
                            "regenerate it") from None


def write_tensors(path: str | Path, tensors: Mapping[str, torch.Tensor],
                  metadata: Mapping[str, str] | None = None) -> None:
    from safetensors.torch import save

    out, storages = {}, set()
    for k, v in tensors.items():
        v = v.detach().contiguous().cpu()
        ptr = v.untyped_storage().data_ptr()
        if ptr in storages and v.numel():  # safetensors refuses tensors that share memory: copy
            v = v.clone()
        storages.add(v.untyped_storage().data_ptr())
        out[k] = v
    data = save(out, metadata=dict(metadata) if metadata else None)
    _atomic_replace(Path(path), lambda f: f.write(data))


def read_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    return read_tensors_and_metadata(path)[0]


def read_tensors_and_metadata(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors of a safetensors file and the string metadata of its header."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: file not found; check the path")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        return tensors, header
    except Exception as e:  # safetensors raises several types for damaged files
        raise ArtifactError(f"{path}: not a readable safetensors file ({_one_line(e)}); "
                            "the file is damaged, regenerate it") from None


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:200]


def _with(stem: Path, suffix: str) -> Path:
    return stem.with_name(stem.name + suffix)


def save_artifact(stem: str | Path, kind: str, tensors: Mapping[str, torch.Tensor],
                  meta: Mapping[str, Any]) -> None:
    """Write ``stem.safetensors`` (tensors, metadata in the header) then its JSON copy
    ``stem.json``; the metadata names the tensors' digest."""
    stem = Path(stem)
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    # this write's own keys last: the metadata of a loaded artifact carries the old digest
    full = strict_json({**meta, "schema_version": SCHEMA_VERSION, "kind": kind,
                        "tensors_sha256": tensors_digest(tensors)})
    text = json.dumps(full, sort_keys=True, allow_nan=False)
    write_tensors(_with(stem, ".safetensors"), tensors, {META_KEY: text})
    write_json(_with(stem, ".json"), full)


def artifact_exists(stem: str | Path) -> bool:
    """Whether an artifact was written at ``stem`` (its safetensors file, or an old-style JSON)."""
    stem = Path(stem)
    return _with(stem, ".safetensors").is_file() or _with(stem, ".json").is_file()


def remove_artifact(stem: str | Path) -> None:
    """Delete the artifact at ``stem`` (both files; missing ones are fine)."""
    stem = Path(stem)
    _with(stem, ".json").unlink(missing_ok=True)
    _with(stem, ".safetensors").unlink(missing_ok=True)


def load_artifact(stem: str | Path, kind: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and metadata of the artifact at ``stem``, checked: kind, schema version, and that
    the tensors are the ones the metadata was written with.  Executes nothing from the files."""
    stem = Path(stem)
    st = _with(stem, ".safetensors")
    if not st.is_file() and not _with(stem, ".json").is_file():
        raise ArtifactError(f"{stem}: no artifact here ({st.name} not found); check the path")
    tensors, header = read_tensors_and_metadata(st)
    if META_KEY in header:
        try:
            meta = json.loads(header[META_KEY])
        except json.JSONDecodeError:
            raise ArtifactError(f"{st}: its metadata is not valid JSON; the file is damaged, "
                                "regenerate it") from None
    else:  # written before the header copy: the JSON file is the metadata
        meta = read_json(_with(stem, ".json"))
    if not isinstance(meta, dict) or meta.get("kind") != kind:
        raise ArtifactError(f"{stem}.json: not a {kind} artifact; pass the right file")
    if meta.get("schema_version") != SCHEMA_VERSION:
        raise ArtifactError(f"{stem}.json: schema version {meta.get('schema_version')} is not "
                            f"{SCHEMA_VERSION}; regenerate it with this version of ditaccel")
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
    profile, plan or Shiva artifact made for another model.

    The same weights in another floating dtype are the same model: a profile made in fp32 fits
    the model loaded in bf16 or fp16.  So the weights enter through what every rounding keeps,
    the sign bit of each value (a strided sample of up to 4096 values per tensor), beside every
    tensor's name and shape; integer buffers enter whole.  Other weights (another training run,
    a fine-tune) differ in thousands of those signs.

    >>> model_fingerprint(model) == model_fingerprint(copy.deepcopy(model).to(torch.bfloat16))
    True
    """
    h = hashlib.sha256(type(model).__name__.encode())
    config = getattr(model, "config", None)
    if config is not None:
        # private keys (_name_or_path, _diffusers_version, ...) say where and how it was saved, not what it is
        public = {k: v for k, v in dict(config).items() if not k.startswith("_")}
        h.update(json.dumps(public, sort_keys=True, default=str).encode())
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(p.shape)).encode())
        flat = p.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 4096)]  # keeps this fast on multi-GB models
        if p.is_floating_point():
            h.update(b"sign")
            h.update(torch.signbit(sample).cpu().numpy().tobytes())
        else:
            h.update(sample.cpu().numpy().tobytes())
    return h.hexdigest()[:16]
