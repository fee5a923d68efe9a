"""How much of a plan's saved work becomes saved time: for each of our methods, the FLOP
speedup, the op speedup (aten ops dispatched by the full model over those of the plan, counted by
``ditaccel.metrics.OpCounter`` over one trajectory: a hardware-independent proxy for kernel
launches and Python/dispatcher work) and the measured speedup (median of ``--repeats``
back-to-back pairs with the unplanned model, order alternating, after a warm-up), on three models:

- ``narrow``: a narrow, deep DiT (28 layers, width 128, 16 tokens, random weights, fp32, one
  thread, one image): overhead-bound, where per-op cost is everything;
- ``bundled``: the bundled ``fmnist-dit`` (8 layers, width 192, 196 tokens), 16 images per call,
  ``--dtype`` (auto: bf16 where native): compute-bound;
- ``xl``: the DiT-XL/2 shape (28 layers, 1152 wide, 256 tokens, random weights; ``build`` of
  ``xl_latency.py``), one image (on a CPU, ``--xl-layers`` shortens it: see the table's caption).

All with DDIM-``--steps`` (default 20) and classifier-free guidance as one batch of two rows per
image.  Methods: FORA intervals 2 and 3, FORA with first-order forecasts at 3, ToCa-style at 3,
SODA at FLOP budgets 2 and 3 (profiled and calibrated on the model it runs, as ``bench`` does;
plans kept under ``results/plans/efficiency-<model>/``), Shiva routing at keep 0.6 with an
untrained router (every block after the first routes 60% of its tokens; its cost, not its
fidelity, is measured), and ``all-anchor`` (our runtime with nothing to skip).

Targets checked under the table: op speedup >= 0.9 x FLOP speedup for the cache-only plans (FORA,
FORA-forecast, SODA's plans that only cache), measured >= 0.85 x FLOP speedup on ``narrow`` and
>= 0.9 x on ``bundled`` for the same plans.

With ``--compile`` our plans run as compiled step programs (``apply(..., compile=True)``), each
measured against the full model compiled the same way (a ``compiled-full`` row: the compiled full
model against the eager one); ops are not counted (compiled code calls its kernels without the
dispatcher); target: measured >= 0.85 x FLOP speedup for the cache-only plans.

Rows are kept in ``results/<out-name>.partial.jsonl`` as they finish; the same command resumes.
Rewrites its page's ``efficiency`` (``efficiency-compiled``) block.

    python benchmarks/efficiency.py [--models narrow,bundled,xl --steps 20 --repeats 5]
    python benchmarks/efficiency.py --compile --models narrow,bundled
    python benchmarks/efficiency.py --replot [--out-name efficiency-compiled]
    python benchmarks/efficiency.py --models narrow --steps 6 --repeats 1 --out-name efficiency-check  # quick
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time

import torch
from diffusers import DDIMScheduler, DiTTransformer2DModel

from common import RESULTS, all_anchor_entry, machine, measure_entry, replace_block, resume_partial, save_json
from ditaccel.bench import Entry, counted, method_entries
from ditaccel.io import write_text
from ditaccel.methods import model_shape
from ditaccel.metrics import OpCounter
from ditaccel.pipeline import DiTPixelPipeline
from ditaccel.registry import DTYPES, load_pipeline, resolve_dtype
from ditaccel.runtime import RUNTIME_REVISION, apply, remove
from ditaccel.sampling import sample

SWEEPS = {"fora": (2.0, 3.0), "fora-forecast": (3.0,), "toca": (3.0,), "soda": (2.0, 3.0)}
SHIVA_KEEP = 0.6
GUIDANCE = 4.0
# the plans whose reusing steps only reuse or forecast cached outputs (targets apply to these)
CACHE_ONLY = ("fora", "fora-forecast")


def narrow() -> DiTTransformer2DModel:
    torch.manual_seed(0)
    return DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=64, in_channels=4, out_channels=8,
                                 num_layers=28, sample_size=8, patch_size=2, num_embeds_ada_norm=1000,
                                 norm_type="ada_norm_zero").eval()


def model(name: str, dtype: str, xl_layers: int):
    """(pipeline, labels of the timed images, labels for SODA's calibration, threads)."""
    if name == "bundled":
        return load_pipeline("fmnist-dit", dtype), [i % 10 for i in range(16)], [3, 7], None
    if name == "narrow":
        tf = narrow()
        threads = 1
    else:
        from xl_latency import build

        tf, threads = build(xl_layers).to(DTYPES[dtype]), None
    pipe = DiTPixelPipeline(transformer=tf, scheduler=DDIMScheduler(num_train_timesteps=1000))
    return pipe, [207], [360], threads


def shiva_entry(pipe, steps: int, compile=False) -> Entry:
    """Routing at keep 0.6 with an untrained router (its cost is what is measured)."""
    from ditaccel.methods.shiva.policy import plan_from_ratios
    from ditaccel.methods.shiva.router import ShivaRouter

    shape = model_shape(pipe.transformer, steps)
    ratios = torch.full((steps, shape.num_layers), SHIVA_KEEP, dtype=torch.float64)
    plan = plan_from_ratios(ratios, shape.num_tokens, shape.modules, multiple=8 if shape.num_tokens >= 64 else 1)
    router = ShivaRouter.for_model(pipe.transformer).to(pipe.transformer.dtype).eval()

    def prepare(p):
        def attach(q):
            apply(q, plan, router=router, compile=compile)
            return lambda: remove(q)
        return attach

    return Entry("shiva", "ours", "keep", SHIVA_KEEP, prepare)


def ops_of(run, pipe) -> int:
    with torch.no_grad(), OpCounter() as c:
        run(pipe)
    return c.total


def measure(name: str, args, dtype: str, done: dict, partial) -> list[dict]:
    pipe, labels, cal_labels, threads = model(name, dtype, args.xl_layers)
    pipe.set_progress_bar_config(disable=True)
    saved_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        opts = dict(sampler="ddim", steps=args.steps, guidance_scale=GUIDANCE, progress=False, count_flops=False)
        timed = lambda p: sample(p, labels, seed=0, batch_size=len(labels), **opts)[0]  # noqa: E731
        cal_run = lambda p: sample(p, cal_labels, seed=500_000, batch_size=len(cal_labels), **opts)[0]  # noqa: E731

        def make_profile():
            from ditaccel.profiling import ProfileConfig, profile

            return profile(pipe, config=ProfileConfig(class_labels=[cal_labels[0], labels[0]] * 2, sampler="ddim",
                                                      steps=args.steps, guidance_scale=GUIDANCE, seed=100_000,
                                                      batch_size=4))

        tag = name if name != "xl" or args.xl_layers == 28 else f"xl-l{args.xl_layers}"
        entries = method_entries(pipe, args.steps, methods=list(SWEEPS), sweeps=SWEEPS,
                                 profile=functools.cache(make_profile), calibration_run=cal_run,
                                 plan_dir=RESULTS / "plans" / f"efficiency-{tag}-s{args.steps}",
                                 compile=args.compile)
        baseline = None
        if args.compile:  # against the full model compiled the same way (warmed up here)
            full = all_anchor_entry(pipe, args.steps, compile=True)
            baseline = full.prepare(pipe)
            detach = baseline(pipe)
            with torch.no_grad():
                timed(pipe)
            detach()
            entries = [Entry("compiled-full", "ours", "-", 0.0, full.prepare), *entries]
        else:
            entries = [all_anchor_entry(pipe, args.steps), *entries]
        entries.append(shiva_entry(pipe, args.steps, compile=args.compile))
        with torch.no_grad():
            timed(pipe)  # warm-up
            _, full_flops = counted(timed, pipe)
        full_ops = ops_of(timed, pipe)
        rows = []
        for e in entries:
            key = (tag, e.method, e.value)
            if key in done:
                rows.append(done[key])
                continue
            # (compiled code calls its kernels without the dispatcher: ops are counted eagerly only)
            flops, (ops, plan), ratios = measure_entry(
                pipe, timed, e, args.repeats, lambda p: (None if args.compile else ops_of(timed, p), _plan_of(p)),
                baseline=None if e.method == "compiled-full" else baseline)
            row = {"model": tag, "method": e.method, "knob": e.knob, "value": e.value,
                   "cache_only": e.method in CACHE_ONLY or (e.method == "soda" and plan is not None
                                                              and not bool(((plan.tokens > 0)).any())),
                   "speedup_flops": full_flops / flops, "speedup_ops": None if ops is None else full_ops / ops,
                   "speedup_measured": statistics.median(ratios), "ratios": ratios, "ops": ops, "full_ops": full_ops}
            done[key] = row
            rows.append(row)
            print(json.dumps(row), flush=True)
            with partial.open("a") as f:
                f.write(json.dumps(row) + "\n")
        return rows
    finally:
        torch.set_num_threads(saved_threads)


def _plan_of(pipe):
    from ditaccel.runtime import state_of

    state = state_of(pipe)
    return None if state is None else state.plan


MODELS = ("narrow", "bundled", "xl")
TARGETS = {"narrow": 0.85, "bundled": 0.9}
COMPILED_TARGET = 0.85  # compiled plans against the compiled full model (the captured target)


def checks(rows: list[dict], compiled: bool = False) -> list[str]:
    """The targets, one line per miss (an empty list: all met)."""
    out = []
    for r in rows:
        if not r["cache_only"]:
            continue
        name = f"{r['model']} {r['method']} {r['knob']}={r['value']:g}"
        if r["speedup_ops"] is not None and r["speedup_ops"] < 0.9 * r["speedup_flops"]:
            out.append(f"{name}: op speedup {r['speedup_ops']:.2f}x < 0.9 x FLOP speedup {r['speedup_flops']:.2f}x")
        base = r["model"].split("-")[0]
        target = COMPILED_TARGET if compiled else TARGETS.get(base)
        if target is not None and r["speedup_measured"] < target * r["speedup_flops"]:
            out.append(f"{name}: measured {r['speedup_measured']:.2f}x < {target} x FLOP speedup "
                       f"{r['speedup_flops']:.2f}x")
    return out


def write_table(out: dict, name: str) -> None:
    compiled = out.get("compiled", False)
    lines = ["| model | method | knob | FLOP speedup | op speedup | measured speedup | measured / FLOP |",
             "|---|---|---|---|---|---|---|"]
    for r in out["rows"]:
        knob = "-" if r["method"] in ("all-anchor", "compiled-full") else f"{r['knob']}={r['value']:g}"
        ops = "-" if r["speedup_ops"] is None else f"{r['speedup_ops']:.2f}x"
        lines.append(f"| {r['model']} | {r['method']} | {knob} | {r['speedup_flops']:.2f}x | {ops} | "
                     f"{r['speedup_measured']:.2f}x | {r['speedup_measured'] / r['speedup_flops']:.2f} |")
    misses = checks(out["rows"], compiled)
    caption = (f"DDIM-{out['steps']}, CFG as one batch; models: " + "; ".join(
        f"{m} ({d})" for m, d in out["dtypes"].items()) + f". Runtime revision {out['runtime']}, {out['cpu']}, "
        f"{out['threads']} threads (narrow: 1); measured: median of {out['repeats']} interleaved pairs. ")
    if compiled:
        caption += ("Compiled (`apply(..., compile=True)`: each step pattern one torch.compile'd program, inductor; "
                    "Shiva by blocks): every plan measured against the full model compiled the same way, except "
                    "compiled-full: the compiled full model against the eager one. Compilation happens in a "
                    "warm-up run, not timed.")
    else:
        caption += "Op speedup: aten ops dispatched over one trajectory, full / plan."
    if out.get("xl_layers", 28) != 28 and any(r["model"].startswith("xl") for r in out["rows"]):
        caption += f" xl: {out['xl_layers']} of DiT-XL/2's 28 layers (a CPU run; the GPU run has all 28)."
    lines += ["", caption, ""]
    if compiled:
        lines.append(f"Target (cache-only plans, compiled: measured >= {COMPILED_TARGET} x FLOP speedup against the "
                     "compiled full model): " + ("met." if not misses else f"{len(misses)} missed: " + "; ".join(misses) + "."))
    else:
        lines.append("Targets (cache-only plans: op >= 0.9 x FLOP speedup; measured >= 0.85 x FLOP on narrow, "
                     ">= 0.9 x on bundled): " + ("met." if not misses else f"{len(misses)} missed: " + "; ".join(misses) + "."))
    text = "\n".join(lines) + "\n"
    write_text(RESULTS / f"{name}.md", text)
    if name in ("efficiency", "efficiency-compiled"):
        replace_block(name, text)


def kept_rows(name: str, settings: dict, models: list[str]) -> tuple[list[dict], dict]:
    """The rows (and dtypes) of the models this run does not measure, from the last result of the
    same name when it was measured with the same settings (so ``--models narrow`` adds to a table
    with ``bundled`` in it instead of replacing it)."""
    path = RESULTS / f"{name}.json"
    if not path.exists():
        return [], {}
    old = json.loads(path.read_text())
    same = ("steps", "repeats", "xl_layers", "cpu", "threads", "runtime", "compiled")
    if any(old.get(k) != settings[k] for k in same):
        return [], {}
    rows = [r for r in old["rows"] if r["model"].split("-")[0] not in models]
    dtypes = {m: d for m, d in old["dtypes"].items() if m not in models}
    return rows, dtypes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="narrow,bundled,xl")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dtype", default="auto", help="bundled and xl (narrow runs in fp32)")
    ap.add_argument("--xl-layers", type=int, default=28)
    ap.add_argument("--compile", action="store_true",
                    help="our plans as compiled step programs, against the full model compiled")
    ap.add_argument("--out-name", default=None, help="default: efficiency (efficiency-compiled with --compile)")
    ap.add_argument("--replot", action="store_true")
    args = ap.parse_args()
    args.out_name = args.out_name or ("efficiency-compiled" if args.compile else "efficiency")
    if args.compile:  # every plan's programs share the transformer's code object: room for all
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 512)
        torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit, 1024)
    if args.replot:
        write_table(json.loads((RESULTS / f"{args.out_name}.json").read_text()), args.out_name)
        return
    models = [m for m in args.models.split(",") if m]
    bad = [m for m in models if m not in MODELS]
    if bad or args.steps < 4 or args.repeats < 1:
        raise SystemExit(f"--models from narrow, bundled, xl (got {bad}); --steps >= 4, --repeats >= 1")
    dtype = resolve_dtype(args.dtype)
    dtypes = {m: ("fp32" if m == "narrow" else dtype) for m in models}
    settings = {"steps": args.steps, "repeats": args.repeats, "dtypes": dtypes, "xl_layers": args.xl_layers,
                "cpu": machine(), "threads": torch.get_num_threads(), "runtime": RUNTIME_REVISION,
                "compiled": args.compile}
    partial = RESULTS / f"{args.out_name}.partial.jsonl"
    _, rows = resume_partial(partial, settings)
    done = {(r["model"], r["method"], r["value"]): r for r in rows}
    t0 = time.time()
    rows = []
    for m in models:
        rows += measure(m, args, dtypes[m], done, partial)
    kept, kept_dtypes = kept_rows(args.out_name, settings, models)
    out = {**settings, "dtypes": {**kept_dtypes, **dtypes}, "total_s": time.time() - t0,
           "rows": sorted(kept + rows, key=lambda r: MODELS.index(r["model"].split("-")[0]))}
    save_json(args.out_name, out)
    write_table(out, args.out_name)
    partial.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
