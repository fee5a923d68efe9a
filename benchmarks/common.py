"""Shared by the benchmark scripts: where results go and how the blocks of README and docs/ pages
are regenerated."""

from __future__ import annotations

import json
import re
from pathlib import Path

from ditaccel.io import write_text

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def machine() -> str:
    """The CPU model and whether it has native bf16 (timings from machines differ several fold)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        import platform

        return platform.processor() or platform.machine()
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    native = [f for f in ("amx_bf16", "avx512_bf16") if f in flags]
    return f"{name} ({'bf16: ' + ', '.join(native) if native else 'no native bf16'})"


def save_json(name: str, data: dict) -> None:
    """Write ``results/<name>.json``."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(data, indent=2) + "\n")


def publish(stem: str, block: str, out: dict, report) -> str:
    """Write ``results/<stem>.json`` (``out``) and ``results/<stem>.md`` (``report(out)``), put the
    report in the pages' ``block`` and print it; returns the report."""
    write_text(RESULTS / f"{stem}.json", json.dumps(out, indent=2) + "\n")
    text = report(out)
    write_text(RESULTS / f"{stem}.md", text)
    replace_block(block, text)
    print(text)
    return text


def replace_block(name: str, text: str, pages: list[Path] | None = None) -> None:
    """Replace what stands between ``<!-- name:begin -->`` and ``<!-- name:end -->`` in the page
    that holds them (README.md or one under docs/; ``pages``: where to look instead)."""
    pattern = re.compile(rf"(<!-- {name}:begin -->\n).*?(<!-- {name}:end -->)", re.S)
    pages = pages if pages is not None else [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    for page in pages:
        src = page.read_text()
        if pattern.search(src):
            # the scripts link files from the repository root; a page under docs/ links from there
            if page.resolve().parent != ROOT:
                text = text.replace("](benchmarks/", "](../benchmarks/")
            write_text(page, pattern.sub(lambda m: m.group(1) + text.rstrip() + "\n" + m.group(2), src))
            return
    raise SystemExit(f"no page has a <!-- {name}:begin/end --> block (README.md, docs/*.md)")


def real_test_features(fx, n: int = 10_000):
    """EfficientNet-lite0 features of the first ``n`` Fashion-MNIST test images, kept under
    runs/cache/ (safetensors) so that benchmark runs on a slow machine compute them once."""
    from safetensors.torch import load_file, save_file

    from ditaccel.data import load_fashion_mnist

    precision = "-bf16" if getattr(fx, "bf16", False) else ""  # the features' precision is part of the key
    path = ROOT / "runs" / "cache" / f"fmnist-test-features-{n}{precision}.safetensors"
    if path.exists():
        return load_file(path)["features"]
    x_test, _ = load_fashion_mnist("test")
    feats = fx((x_test[:n] + 1) / 2)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({"features": feats.contiguous()}, tmp)
    tmp.replace(path)
    return feats


def resume_partial(partial: Path, settings: dict, finished: Path | None = None,
                   keep=lambda row: True) -> tuple[dict, list[dict]]:
    """The header and rows a stopped run left in ``partial`` (JSON lines, the first holding its
    settings) when it ran with ``settings``; otherwise ``partial`` starts afresh with the header alone,
    then takes the rows of ``finished`` (a finished run's JSON) for which ``keep(row)`` holds, where
    that run's settings are ``settings``: a later run adds to an earlier one instead of redoing it."""
    import json

    if partial.exists():
        lines = [json.loads(x) for x in partial.read_text().splitlines() if x.strip()]
        if lines and lines[0].get("settings") == settings and len(lines) > 1:
            print(f"resuming: {len(lines) - 1} rows already measured in {partial.name}", flush=True)
            return lines[0], lines[1:]
        if lines and lines[0].get("settings") != settings:
            print(f"{partial.name} is from other settings: starting over", flush=True)
    rows = []
    if finished is not None and finished.exists():
        done = json.loads(finished.read_text())
        if all(done.get(k) == v for k, v in settings.items()):
            rows = [r for r in done["rows"] if keep(r)]
            if rows:
                print(f"keeping {len(rows)} rows of the finished run in {finished.name} (same settings)", flush=True)
    partial.parent.mkdir(parents=True, exist_ok=True)
    partial.write_text("".join(json.dumps(x) + "\n" for x in [{"settings": settings}, *rows]))
    return {"settings": settings}, rows


def all_anchor_entry(pipe, steps: int, compile=False):
    """The bench entry that runs our runtime with nothing to skip (every step an anchor): its cost
    (``compile``: as compiled programs, the full model compiled)."""
    from ditaccel.bench import Entry
    from ditaccel.methods import model_shape
    from ditaccel.plan import full_plan
    from ditaccel.runtime import apply, remove

    shape = model_shape(pipe.transformer, steps)
    plan = full_plan(steps, shape.num_layers, shape.num_tokens, shape.modules)

    def prepare(p):
        def attach(q):
            apply(q, plan, compile=compile)
            return lambda: remove(q)
        return attach

    return Entry("all-anchor", "ours", "-", 0.0, prepare)


def measure_entry(pipe, timed, entry, repeats: int, while_on=None, baseline=None):
    """One bench entry on ``pipe``: switched on, ``timed`` run once to warm up (and do a plan's
    one-off work), its FLOPs counted on a second run, ``while_on(pipe)`` (further measures, or
    None) taken while it is on; switched off; then ``repeats`` interleaved pairs with the full
    model (``baseline``: an attach for the full side, see ``speedup_pairs``).  Returns (flops, what
    while_on returned, ratios full / method)."""
    import torch

    from ditaccel.bench import counted
    from ditaccel.sampling import speedup_pairs

    attach = entry.prepare(pipe)
    detach = attach(pipe)
    try:
        with torch.no_grad():
            timed(pipe)
            _, flops = counted(timed, pipe)
            extra = while_on(pipe) if while_on is not None else None
    finally:
        detach()
    with torch.no_grad():
        ratios = speedup_pairs(pipe, timed, attach, repeats, baseline=baseline)
    return flops, extra, ratios


def load_reference(stem: Path, kind: str, settings: dict) -> tuple | None:
    """The full model's scored images and FLOPs a run kept at ``stem`` (see :func:`save_reference`),
    or None when there are none or they were made with other ``settings``."""
    from ditaccel.io import artifact_exists, load_artifact

    if not artifact_exists(stem):
        return None
    tensors, meta = load_artifact(stem, kind)
    return (tensors["images"], int(meta["flops"])) if meta.get("settings") == settings else None


def save_reference(stem: Path, kind: str, settings: dict, images, flops: int) -> None:
    """Keep the full model's scored images beside a resumable run's rows, keyed by ``settings``: a
    resumed run scores against the very images its earlier rows were scored against."""
    from ditaccel.io import save_artifact

    save_artifact(stem, kind, {"images": images}, {"settings": settings, "flops": int(flops)})


def fidelity_rows(stem: str, settings: dict, pipe, labels: list[int], entries, *, sampler: str, steps: int,
                  cfg: float, batch: int, real: int, keep=lambda row: True) -> dict:
    """Fidelity only (no timing) of ``entries`` on ``pipe`` against the full model, resumable:
    ``ditaccel.bench.measure`` with classifier agreement with ``labels`` and FD vs the first ``real``
    Fashion-MNIST test images beside its PSNR / SSIM / FD vs the full model, images sampled with
    ``sampler`` / ``steps`` / guidance ``cfg``, seed 0.  ``settings`` (everything that changes the
    images or the scores) key what is kept: the full model's images (``results/<stem>.full``), the rows of a stopped run (``results/<stem>.partial.jsonl``) and the
    rows of the finished run (``results/<stem>.json``) for which ``keep(row)`` holds.  Returns
    ``measure``'s result; the caller publishes it and then removes the partial file."""
    import torch

    from ditaccel.bench import MeasureConfig, measure
    from ditaccel.metrics import feature_extractor, frechet_distance
    from ditaccel.models.classifier import predict
    from ditaccel.registry import load_classifier_asset
    from ditaccel.sampling import sample

    opts = dict(sampler=sampler, steps=steps, guidance_scale=cfg, progress=False, count_flops=False)

    def run(p):
        return sample(p, labels, seed=0, batch_size=batch, **opts)[0]

    classifier = load_classifier_asset()
    fx = feature_extractor()
    real_feats = real_test_features(fx, real)

    def extra(images) -> dict:
        return {"fd_vs_test": frechet_distance(fx(images), real_feats),
                "class_agreement": float((predict(classifier, images * 2 - 1) == torch.tensor(labels)).float().mean())}

    partial = RESULTS / f"{stem}.partial.jsonl"
    _, resumed = resume_partial(partial, settings, RESULTS / f"{stem}.json", keep=lambda r: r["method"] != "full" and keep(r))
    reference, kind = RESULTS / f"{stem}.full", f"{stem.split('-')[0].replace('_', '-')}-reference"
    full = load_reference(reference, kind, settings)
    resumed = [r for r in resumed if keep(r)] if full is not None else []

    def keep_full(images, flops):
        save_reference(reference, kind, settings, images, flops)

    def on_row(row):
        print(json.dumps({k: v for k, v in row.items() if isinstance(v, (int, float, str))}), flush=True)
        with partial.open("a") as f:
            f.write(json.dumps(row) + "\n")

    return measure(pipe, run, None, entries, MeasureConfig(repeats=0, extra=extra, feature_extractor=fx, on_row=on_row,
                                                          resumed=resumed, full=full, on_full=keep_full))
