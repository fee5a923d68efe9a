"""One prepared run for a machine with a GPU: how much of each method's saved work
becomes saved time on the DiT-XL/2 shape (28 layers, 1152 wide, random weights, bf16), ours beside
the peers, at two sizes: 256 tokens x 1 image (CFG: 2 rows per call) and 1024 tokens x 4 images
(8 rows).  DDIM-20.

Per size: the eager full model's time per trajectory; per method: FLOP speedup (one trajectory
under ``ditaccel.metrics.flop_counter``) and measured speedup against the eager full model (median
of ``--repeats`` back-to-back pairs, order alternating, after a warm-up); with ``--capture`` (the
default on CUDA) the full model captured as a CUDA graph through ``torch.compile(mode=
"reduce-overhead", fullgraph=True)`` beside it, and then our plans as captured step programs
(``apply(..., compile=...)``, ``--capture-backend``), each against the full plan captured the same
way (rows "(captured)"; their measured speedup is against that captured full model).  Methods: ours (all-anchor, FORA 2 and 3,
FORA-forecast 3, ToCa 3, SODA 2 and 3 profiled and calibrated on this model, Shiva routing at keep
0.6 with an untrained router) and the peers users have (diffusers' TaylorSeer 2 and 3, MagCache
0.04, first-block cache 0.2; cache-dit's DBCache 0.2 where cache-dit is installed).

Every row is appended to ``OUT/gpu_efficiency.jsonl`` as it finishes (``--out``, default
``$OUT``, else ``benchmarks/results``), and ``OUT/gpu_efficiency.md`` is rewritten after each,
so a run stopped at its time limit still returns what it measured; ``--budget-s`` skips what
would not fit.  On the GPU machine, whose python may lack diffusers and cache-dit, they install
from wheels carried along (see the device notes):

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && \\
        PYTHONPATH=/tmp/site:src python3 benchmarks/gpu_efficiency.py --out $OUT
    python benchmarks/gpu_efficiency.py --device cpu --layers 2 --steps 4 --repeats 1  # end to end on a CPU
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

SIZES = {"256x1": (32, 1), "1024x4": (64, 4)}  # latent side (patch 2 -> tokens), images
OURS = {"fora": (2.0, 3.0), "fora-forecast": (3.0,), "toca": (3.0,), "soda": (2.0, 3.0)}
PEERS = {"taylorseer": (2.0, 3.0), "magcache": (0.04,), "fbc": (0.2,), "dbcache": (0.2,)}
LABEL, CAL_LABEL, GUIDANCE = 207, 360, 4.0


def build(side: int, layers: int, device, dtype):
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    tf = DiTTransformer2DModel(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8,
                               num_layers=layers, sample_size=side, patch_size=2, num_embeds_ada_norm=1000,
                               norm_type="ada_norm_zero")
    return tf.to(device=device, dtype=dtype).eval()


class Report:
    """Rows appended as they finish, the table rewritten after each."""

    def __init__(self, out: Path, header: dict):
        self.out, self.header, self.rows = out, header, []
        out.mkdir(parents=True, exist_ok=True)
        (out / "gpu_efficiency.jsonl").write_text(json.dumps({"settings": header}) + "\n")

    def add(self, row: dict) -> None:
        self.rows.append(row)
        print(json.dumps(row), flush=True)
        with (self.out / "gpu_efficiency.jsonl").open("a") as f:
            f.write(json.dumps(row) + "\n")
        self.table()

    def table(self) -> None:
        h = self.header
        lines = [f"{h['device_name']}, torch {h['torch']}, bf16 (fp32 where the device has no native bf16: "
                 f"{h['dtype']}), DDIM-{h['steps']}, {h['layers']} layers, random weights; median of "
                 f"{h['repeats']} interleaved pairs against the eager full model (rows '(captured)': against "
                 "the full model captured as our programs).", "",
                 "| size | method | library | knob | FLOP speedup | measured speedup | measured / FLOP | ms per trajectory |",
                 "|---|---|---|---|---|---|---|---|"]
        for r in self.rows:
            knob = "-" if r.get("value") is None or r.get("knob") == "-" else f"{r['knob']}={r['value']:g}"
            flop = f"{r['speedup_flops']:.2f}x" if r.get("speedup_flops") else "-"
            eff = f"{r['speedup_measured'] / r['speedup_flops']:.2f}" if r.get("speedup_flops") else "-"
            lines.append(f"| {r['size']} | {r['method']} | {r['library']} | {knob} | {flop} | "
                         f"{r['speedup_measured']:.2f}x | {eff} | {r['ms']:.1f} |")
        (self.out / "gpu_efficiency.md").write_text("\n".join(lines) + "\n")


def timed_ms(run, pipe, repeats: int, device) -> float:
    from ditaccel.devices import synchronize

    times = []
    for _ in range(repeats):
        synchronize(device)
        t = time.perf_counter()
        run(pipe)
        synchronize(device)
        times.append(1000 * (time.perf_counter() - t))
    return statistics.median(times)


def run_size(size: str, args, device, dtype, report: Report, deadline: float) -> None:
    from diffusers import DDIMScheduler

    from ditaccel.bench import counted, method_entries
    from ditaccel.peers import PEERS as AVAILABLE
    from ditaccel.pipeline import DiTPixelPipeline
    from ditaccel.sampling import sample
    from common import all_anchor_entry, measure_entry
    from efficiency import shiva_entry

    side, images = SIZES[size]
    pipe = DiTPixelPipeline(transformer=build(side, args.layers, device, dtype),
                            scheduler=DDIMScheduler(num_train_timesteps=1000))
    pipe.set_progress_bar_config(disable=True)
    opts = dict(sampler="ddim", steps=args.steps, guidance_scale=GUIDANCE, progress=False, count_flops=False)
    labels = [LABEL + i for i in range(images)]
    timed = lambda p: sample(p, labels, seed=0, batch_size=images, **opts)[0]  # noqa: E731
    cal_run = lambda p: sample(p, [CAL_LABEL], seed=500_000, batch_size=1, **opts)[0]  # noqa: E731

    def make_profile():
        from ditaccel.profiling import ProfileConfig, profile

        return profile(pipe, config=ProfileConfig(class_labels=[CAL_LABEL, LABEL], sampler="ddim", steps=args.steps,
                                                  guidance_scale=GUIDANCE, seed=100_000, batch_size=2,
                                                  timing_repeats=2, progress=False))

    peers = [m for m in PEERS if m in args.methods and m in AVAILABLE and _available(AVAILABLE[m].library)]
    ours = [m for m in OURS if m in args.methods]
    profiled = functools.cache(make_profile)
    plan_dir = Path(args.out) / "plans" / size  # SODA's calibrated plans, shared by eager and captured rows
    entries = method_entries(pipe, args.steps, methods=ours + peers, sweeps={**OURS, **PEERS},
                             profile=profiled, calibration_run=cal_run, plan_dir=plan_dir)
    entries = [all_anchor_entry(pipe, args.steps), *entries]
    if "shiva" in args.methods:
        entries.append(shiva_entry(pipe, args.steps))
    with torch.no_grad():
        timed(pipe)  # warm-up
        _, full_flops = counted(timed, pipe)
        full_ms = timed_ms(timed, pipe, args.repeats, device)
    report.add({"size": size, "method": "full (eager)", "library": "diffusers", "knob": None, "value": None,
                "speedup_flops": 1.0, "speedup_measured": 1.0, "ms": full_ms})
    if args.capture:
        captured(pipe, timed, full_ms, size, args, device, report)
    for e in entries:
        if time.time() > deadline:
            print(f"time budget spent: skipping {e.method} {e.value:g} at {size}", flush=True)
            continue
        try:
            flops, ms, ratios = measure_entry(pipe, timed, e, args.repeats, lambda p: timed_ms(timed, p, 1, device))
        except Exception as err:  # a peer failing on this machine is reported, not fatal
            print(f"{e.method} {e.value:g} at {size} failed: {type(err).__name__}: {err}", flush=True)
            continue
        report.add({"size": size, "method": e.method, "library": e.family, "knob": e.knob, "value": e.value,
                    "speedup_flops": full_flops / flops, "speedup_measured": statistics.median(ratios),
                    "ratios": ratios, "ms": ms})
    if args.capture:
        captured_plans(pipe, timed, full_ms, full_flops, size, args, device, report, deadline,
                       dict(methods=ours, sweeps=OURS, profile=profiled, calibration_run=cal_run, plan_dir=plan_dir))


def captured_plans(pipe, timed, full_ms: float, full_flops: int, size: str, args, device, report: Report,
                   deadline: float, entry_args: dict) -> None:
    """Our plans as captured step programs (``apply(..., compile=...)`` with ``--capture-backend``),
    each against the full plan captured the same way (one program: the full model)."""
    from ditaccel.bench import method_entries
    from ditaccel.runtime.program import CompileConfig
    from common import all_anchor_entry, measure_entry
    from efficiency import shiva_entry

    options = {"backend": "cudagraphs"} if args.capture_backend == "cudagraphs" else {"mode": "reduce-overhead"}
    config = CompileConfig(options=options)
    full = all_anchor_entry(pipe, args.steps, compile=config)
    baseline = full.prepare(pipe)
    detach = baseline(pipe)
    try:
        compile_s, base_ms = warm_and_time(pipe, timed, args.repeats, device)
    finally:
        detach()
    report.add({"size": size, "method": "full (captured programs)", "library": f"ours/{args.capture_backend}",
                "knob": None, "value": None, "speedup_flops": 1.0, "speedup_measured": full_ms / base_ms,
                "ms": base_ms, "compile_s": compile_s})
    entries = method_entries(pipe, args.steps, **entry_args, compile=config)
    if "shiva" in args.methods:
        entries.append(shiva_entry(pipe, args.steps, compile=config))
    for e in entries:
        if time.time() > deadline:
            print(f"time budget spent: skipping captured {e.method} {e.value:g} at {size}", flush=True)
            continue
        try:
            flops, ms, ratios = measure_entry(pipe, timed, e, args.repeats, lambda p: timed_ms(timed, p, 1, device),
                                              baseline=baseline)
        except Exception as err:  # reported, not fatal: the eager rows stand
            print(f"captured {e.method} {e.value:g} at {size} failed: {type(err).__name__}: {err}", flush=True)
            continue
        report.add({"size": size, "method": f"{e.method} (captured)", "library": e.family, "knob": e.knob,
                    "value": e.value, "speedup_flops": full_flops / flops, "speedup_measured": statistics.median(ratios),
                    "against": "captured full", "ratios": ratios, "ms": ms})


def warm_and_time(pipe, timed, repeats: int, device) -> tuple[float, float]:
    """(seconds to compile, record and replay once; then ms per run, median of ``repeats``)."""
    t0 = time.perf_counter()
    with torch.no_grad():
        for _ in range(3):  # compile, record, replay
            timed(pipe)
        compile_s = time.perf_counter() - t0
        return compile_s, timed_ms(timed, pipe, repeats, device)


def captured(pipe, timed, full_ms: float, size: str, args, device, report: Report) -> None:
    """The full model through torch.compile(mode="reduce-overhead", fullgraph=True): on CUDA a
    CUDA graph per input shape."""
    tf = pipe.transformer
    original = tf.forward
    tf.forward = torch.compile(original, mode="reduce-overhead", fullgraph=True)
    try:
        compile_s, ms = warm_and_time(pipe, timed, args.repeats, device)
    finally:
        tf.forward = original
    report.add({"size": size, "method": "full (captured)", "library": "torch", "knob": None, "value": None,
                "speedup_flops": 1.0, "speedup_measured": full_ms / ms, "ms": ms, "compile_s": compile_s})


def _available(library: str) -> bool:
    import importlib.util

    return library != "cache-dit" or importlib.util.find_spec("cache_dit") is not None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--sizes", default=",".join(SIZES))
    ap.add_argument("--methods", default=",".join([*OURS, "shiva", *PEERS]))
    ap.add_argument("--capture", default=None, choices=["on", "off"],
                    help="time the full model captured as a CUDA graph (default: on with CUDA)")
    ap.add_argument("--capture-backend", default="cudagraphs", choices=["cudagraphs", "inductor"],
                    help="our captured step programs: torch.compile backend cudagraphs (eager kernels in CUDA "
                         "graphs; compiles in seconds) or inductor with mode reduce-overhead (fused, slower to "
                         "compile)")
    ap.add_argument("--budget-s", type=float, default=330.0, help="skip rows that would start after this")
    ap.add_argument("--out", default=os.environ.get("OUT") or str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args()
    from ditaccel.devices import resolve_device
    from ditaccel.registry import native_bf16

    device = resolve_device(args.device)
    args.methods = [m for m in args.methods.split(",") if m]
    args.capture = (args.capture or ("on" if device.type == "cuda" else "off")) == "on"
    dtype = torch.bfloat16 if native_bf16(device) else torch.float32
    start = time.time()
    header = {"device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
              else "CPU", "torch": torch.__version__, "dtype": str(dtype).replace("torch.", ""), "steps": args.steps,
              "layers": args.layers, "repeats": args.repeats}
    report = Report(Path(args.out), header)
    for size in [s for s in args.sizes.split(",") if s]:
        run_size(size, args, device, dtype, report, start + args.budget_s)
    print(f"done in {time.time() - start:.0f} s -> {Path(args.out) / 'gpu_efficiency.md'}", flush=True)


if __name__ == "__main__":
    main()
