"""Shiva on a bundled model (``--model fmnist-mmdit``, the SD3-style text model):
trained artifacts against non-learned token routing.

Methods (every block but the first routes exactly k tokens per (step, layer); the rest skip it):
- shiva-<keep>: a trained artifact (``scripts/train_shiva_fmnist.sh``: router, adaptive keep-ratio
  policy compiled to a table, DoRA adapters), and shiva-<keep>-fixed: the same training with the
  ratio held at the target everywhere (the paper's fixed-vs-adaptive ablation);
- topk-<keep>: the same static budget at a uniform ratio, tokens picked by a non-learned score
  (distance of the token from the mean token), no training;
- tome~<shiva method>: ToMe-style token merging (tomesd, attention and MLP, every block) at the
  merge ratio that runs as fast as that Shiva artifact: bisection on the ratio, each probe one
  back-to-back timed pair of ToMe against the Shiva run (``--tome-probes``).

Per method, ``ditaccel.bench.measure``: the scored run under FlopCounterMode (PSNR, SSIM, FD vs the
full model on the same noise), FD vs the Fashion-MNIST test set and classifier agreement, and the
measured speedup (median of alternating back-to-back pairs with the full model).  Also the
learned keep-ratio map (step x layer) as a plot.  Writes results/shiva.{json,md} and
results/shiva_keep_map.png.

    bash scripts/train_shiva_fmnist.sh          # the artifacts (resumable)
    python benchmarks/shiva.py                  # 64 images, DDIM-50, CFG 3
    MODEL=fmnist-mmdit bash scripts/train_shiva_fmnist.sh
    python benchmarks/shiva.py --model fmnist-mmdit   # euler-28
    python benchmarks/shiva.py --model fmnist-mmdit --replot   # table, docs block and map from the JSON

ToMe (tomesd) patches diffusers' BasicTransformerBlock only (DiT, PixArt); on SD3's joint blocks
``ditaccel.peers.attach_tome`` runs tomesd's merge on the image tokens through hooks (the text
tokens are kept, as Shiva keeps them).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from common import RESULTS, ROOT, machine, real_test_features, replace_block, save_json
from ditaccel.bench import Entry, MeasureConfig, measure
from ditaccel.metrics import feature_extractor, frechet_distance
from ditaccel.methods.shiva.inference import apply_shiva, load_shiva, remove_shiva, shiva_plan
from ditaccel.methods.shiva.policy import plan_from_ratios
from ditaccel.models.classifier import predict
from ditaccel.peers import TOME_BLOCKS, attach_tome
from ditaccel.pipeline import SAMPLERS, make_scheduler
from ditaccel.registry import load_classifier_asset, load_pipeline
from ditaccel.runtime import apply, remove
from ditaccel.runtime.apply import compile_count
from ditaccel.runtime.adapters import find_blocks, image_tokens, modules_of
from ditaccel.sampling import sample


def distance_from_mean(x: torch.Tensor, call) -> torch.Tensor:
    """A non-learned token score: how far each token is from its sample's mean token."""
    return (x.float() - x.float().mean(1, keepdim=True)).norm(dim=-1)


def shiva_entry(name: str, stem: Path, sampler: str, steps: int, keep: float) -> Entry:
    """An artifact run at mean keep ``keep`` (its trained target, or another one through the
    exact-budget shift of its learned ratios)."""
    def prepare(pipe):
        art = load_shiva(stem, pipe.transformer)

        def attach(p):
            apply_shiva(p, art, steps, scheduler=make_scheduler(sampler, p.scheduler.config), keep=keep)
            return lambda: remove_shiva(p)
        return attach
    return Entry(name, "shiva", "keep", keep, prepare)


def topk_entry(keep: float, steps: int) -> Entry:
    def prepare(pipe):
        tf = pipe.transformer
        layers = len(find_blocks(tf))
        ratios = torch.full((steps, layers), keep, dtype=torch.float64)
        ratios[:, 0] = 1.0
        plan = plan_from_ratios(ratios, image_tokens(tf), modules_of(tf), 8)

        def attach(p):
            apply(p, plan, router=distance_from_mean)
            return lambda: remove(p)
        return attach
    return Entry(f"topk-{keep:g}", "non-learned", "keep", keep, prepare)


def head_to_head(pipe, timed, attach_a, attach_b) -> float:
    """Wall-clock ratio time(a) / time(b) of ``timed`` with method a and method b back to back
    (one pair): > 1 when b is faster."""
    walls = {}
    for name, attach in (("a", attach_a), ("b", attach_b)):
        detach = attach(pipe)
        try:
            t = time.perf_counter()
            timed(pipe)
            walls[name] = time.perf_counter() - t
        finally:
            detach()
    return walls["a"] / walls["b"]


def tome_entry(match: Entry, timed, probes: int, chosen: dict) -> Entry:
    """ToMe at the merge ratio that runs as fast as the Shiva entry ``match``: bisection on the
    ratio, each probe one back-to-back pair of ToMe against that Shiva run (the order
    alternating), so the match does not depend on the machine's drift; the probe whose time
    ratio came closest to 1 is kept."""
    def at(ratio):
        def attach(p):
            handle = attach_tome(p, ratio)
            return handle.remove
        return attach

    def prepare(pipe):
        shiva = match.prepare(pipe)
        lo, hi, trace = 0.0, 0.74, []
        with torch.no_grad():
            for i in range(probes):  # ToMe gets faster as the ratio grows
                r = round((lo + hi) / 2, 4)
                rel = (head_to_head(pipe, timed, shiva, at(r)) if i % 2 == 0
                       else 1 / head_to_head(pipe, timed, at(r), shiva))   # time(shiva) / time(tome)
                trace.append((r, rel))
                lo, hi = (r, hi) if rel < 1 else (lo, r)
        ratio = min(trace, key=lambda rs: abs(rs[1] - 1))[0]
        chosen[f"tome~{match.method}"] = {"ratio": ratio, "probes": trace,
                                          "shiva_over_tome_time": dict(trace)[ratio]}
        print(f"tome~{match.method}: ratio {ratio} (probes: ratio, time(shiva) / time(tome): {trace})", flush=True)
        return at(ratio)
    return Entry(f"tome~{match.method}", "tomesd", "ratio", float("nan"), prepare)


SAMPLER_NAMES = {"ddim": "DDIM", "ddpm": "DDPM", "dpm++": "DPM-Solver++", "euler": "Euler"}


def keep_map(stems: dict[str, Path], pipe, sampler: str, steps: int, path: Path) -> dict:
    """Plot each artifact's keep ratio per (step, layer) for this sampler, as run (the exact
    budget applied); returns the maps and each policy's own mean keep over these steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sched = make_scheduler(sampler, pipe.scheduler.config)
    sched.set_timesteps(steps)
    tf = pipe.transformer
    maps, learned, graphs = {}, {}, {}
    for name, stem in stems.items():
        art = load_shiva(stem, tf)
        plan = shiva_plan(art, sched.timesteps, image_tokens(tf), modules_of(tf))
        maps[name] = torch.tensor(plan.meta["ratios"]).tolist()
        learned[name] = plan.meta["policy_mean_keep"]
        # what rounding the counts to multiples of 8 buys (compiled graphs) and costs (budget error)
        art.meta["multiple"] = 1
        exact = shiva_plan(art, sched.timesteps, image_tokens(tf), modules_of(tf))
        graphs[name] = {"multiple_8": {"graphs": compile_count(plan), "mean_keep": plan.meta["mean_keep"]},
                        "multiple_1": {"graphs": compile_count(exact), "mean_keep": exact.meta["mean_keep"]}}
    fig, axes = plt.subplots(1, len(maps), figsize=(4.2 * len(maps), 3.6), squeeze=False)
    for ax, (name, m) in zip(axes[0], maps.items()):
        im = ax.imshow(torch.tensor(m).T, aspect="auto", origin="lower", vmin=0, vmax=1, cmap="viridis")
        ax.set_title(name)
        ax.set_xlabel(f"{SAMPLER_NAMES.get(sampler, sampler)} step (0 = noisiest)")
        ax.set_ylabel("layer")
    fig.colorbar(im, ax=axes[0].tolist(), label="keep ratio")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return maps, learned, graphs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="fmnist-dit", choices=["fmnist-dit", "fmnist-pixart", "fmnist-mmdit"])
    ap.add_argument("--artifacts", default=None,
                    help="folder of keep*/shiva artifacts (default runs/shiva, runs/shiva-<model> for the others)")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--timed-batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cfg", type=float, default=3.0)
    ap.add_argument("--sampler", default=None, choices=list(SAMPLERS), help="default: the model's own")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"],
                    help="fp32 by default: CPUs without native bf16 (no AMX / AVX512-BF16) run bf16 slower")
    ap.add_argument("--only", default=None, help="comma-separated method names")
    ap.add_argument("--real", type=int, default=1000, help="Fashion-MNIST test images for FD vs real data")
    ap.add_argument("--tome-probes", type=int, default=4, help="timed probes of ToMe's ratio per Shiva row")
    ap.add_argument("--merge", action="store_true", help="merge these rows into the existing results "
                    "(re-measure some methods with --only without re-running the rest)")
    ap.add_argument("--replot", action="store_true",
                    help="rewrite the table, its page's block and the keep map from the saved JSON (no measuring)")
    ap.add_argument("--keeps", default="", help="also run every artifact (and top-k) at these mean keeps, "
                    "e.g. 0.8,0.9: the learned ratios shifted to that budget")
    args = ap.parse_args()
    t0 = time.time()
    pipe = load_pipeline(args.model, args.dtype)
    from ditaccel.pipeline import default_sampler

    args.sampler = args.sampler or default_sampler(pipe.scheduler)
    steps = SAMPLERS[args.sampler][2]
    tag = "" if args.model == "fmnist-dit" else f"-{args.model}"
    folder = Path(args.artifacts or ROOT / "runs" / ("shiva" + tag.replace("-fmnist", "")))
    kinds = {type(b).__name__ for _, b, _ in find_blocks(pipe.transformer)}
    tomesd_ok = len(kinds) == 1 and kinds <= set(TOME_BLOCKS)
    joint = kinds == {"JointTransformerBlock"}
    stems = {p.parent.name.replace("keep", "shiva-"): p.with_suffix("")
             for p in sorted(folder.glob("keep*/shiva.json"))}
    if not stems:
        raise SystemExit(f"no Shiva artifacts under {folder}; run MODEL={args.model} scripts/train_shiva_fmnist.sh first")
    stem = "shiva" + tag + ("-notime" if not args.repeats else "")
    if args.replot:
        saved = json.loads((RESULTS / f"{stem}.json").read_text())
        for k in ("n", "timed_batch", "repeats", "cfg", "dtype", "sampler"):
            setattr(args, k, saved[k])
        args.real = saved.get("real", 1000)
        report(args, stem, tag, joint, tomesd_ok, saved)
        keep_map(stems, pipe, args.sampler, saved["steps"], RESULTS / f"shiva_keep_map{tag}.png")
        return
    labels = [i % 10 for i in range(args.n)]
    opts = dict(sampler=args.sampler, steps=steps, guidance_scale=args.cfg, progress=False, count_flops=False)
    run = lambda p: sample(p, labels, seed=0, batch_size=args.batch, **opts)[0]  # noqa: E731
    timed = lambda p: sample(p, labels[:args.timed_batch], seed=0, batch_size=args.timed_batch, **opts)  # noqa: E731
    entries = []
    for name, stem in stems.items():
        keep = float(json.loads(stem.with_suffix(".json").read_text())["keep"])
        entries.append(shiva_entry(name, stem, args.sampler, steps, keep))
        for other in (float(v) for v in args.keeps.split(",") if v.strip()):
            if other != keep:
                entries.append(shiva_entry(f"{name}@{other:g}", stem, args.sampler, steps, other))
    for keep in sorted({e.value for e in entries}):
        entries.append(topk_entry(keep, steps))
    chosen = {}
    if args.repeats and tomesd_ok:  # ToMe is matched on measured speed
        entries += [tome_entry(e, timed, args.tome_probes, chosen)
                    for e in entries if e.family == "shiva" and "@" not in e.method and "fixed" not in e.method]
    if args.only:
        entries = [e for e in entries if e.method in args.only.split(",")
                   or (e.method.startswith("tome~") and e.method[5:] in args.only.split(","))]
    classifier = load_classifier_asset()
    fx = feature_extractor()
    real = real_test_features(fx, args.real)  # cached under runs/cache/

    def extra(images) -> dict:
        return {"fd_vs_test": frechet_distance(fx(images), real),
                "class_agreement": float((predict(classifier, images * 2 - 1) == torch.tensor(labels)).float().mean())}

    def show(row):
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()
                          if k != "ratios"}), flush=True)

    res = measure(pipe, run, timed, entries,
                  MeasureConfig(repeats=args.repeats, extra=extra, feature_extractor=fx, on_row=show))
    maps, learned, graphs = keep_map(stems, pipe, args.sampler, steps, RESULTS / f"shiva_keep_map{tag}.png")
    for r in res["rows"]:
        base = r["method"].split("@")[0]
        if base in maps:
            r["mean_keep"], r["policy_mean_keep"] = (r["value"], learned[base]) if "@" in r["method"] else \
                (float(torch.tensor(maps[base])[:, 1:].mean()), learned[base])
        elif r["method"].startswith("topk"):
            r["mean_keep"] = r["value"]
        elif r["method"] in chosen:
            r["value"] = chosen[r["method"]]["ratio"]
            r["tome"] = chosen[r["method"]]
    out = {"model": args.model, "sampler": args.sampler, "steps": steps, "n": args.n, "batch": args.batch, "timed_batch": args.timed_batch,
           "repeats": args.repeats, "cfg": args.cfg, "dtype": args.dtype, "real": args.real, "threads": torch.get_num_threads(),
           "cpu": machine(), "total_s": time.time() - t0, "maps": maps, "compiled_graphs": graphs,
           "artifacts": {k: json.loads(v.with_suffix(".json").read_text())["config"] for k, v in stems.items()}, **res}
    if args.merge and (RESULTS / f"{stem}.json").exists():
        from ditaccel.bench import merge

        old = json.loads((RESULTS / f"{stem}.json").read_text())
        res = merge(old, res)
        out = {**old, **{k: v for k, v in out.items() if k not in ("rows", "skipped", "total_s")}, **res,
               "total_s": old.get("total_s", 0) + out["total_s"]}
    save_json(stem, out)
    report(args, stem, tag, joint, tomesd_ok, out)


def command_of(args, tag: str) -> str:
    parts = ["python benchmarks/shiva.py"] + ([f"--model {args.model}"] if tag else [])
    parts += [f"--{k.replace('_', '-')} {getattr(args, k):g}" for k, default in
              (("n", 64), ("timed_batch", 8), ("repeats", 3), ("cfg", 3.0)) if getattr(args, k) != default]
    return " ".join(parts)


def report(args, stem: str, tag: str, joint: bool, tomesd_ok: bool, out: dict) -> None:
    """The Markdown table with its notes, written to results/<stem>.md and its page's block."""
    graphs = out["compiled_graphs"]
    chosen = {r["method"]: r["tome"] for r in out["rows"] if "tome" in r}
    head = ["method", "mean keep (routed blocks) / ToMe merge ratio", "policy's own mean keep", "measured speedup", "FLOP speedup", "PSNR vs full", "SSIM vs full",
            "FD vs full", "FD vs real test", "classifier agreement"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in out["rows"]:
        if r["method"] == "full":
            lines.append(f"| full | 1.00 | - | 1.00x | 1.00x | - | - | - | {r['fd_vs_test']:.2f} | {r['class_agreement']:.1%} |")
            continue
        sp = f"{r['speedup_measured']:.2f}x" if r.get("speedup_measured") else "-"
        own = f"{r['policy_mean_keep']:.3f}" if "policy_mean_keep" in r else "-"
        keep = f"merge {r['value']:.3f}" if "tome" in r else f"{r['mean_keep']:.3f}"
        lines.append(f"| {r['method']} | {keep} | {own} | {sp} | {r['speedup_flops']:.2f}x | {r['psnr']:.2f} | "
                     f"{r['ssim']:.4f} | {r['fd_vs_full']:.2f} | {r['fd_vs_test']:.2f} | {r['class_agreement']:.1%} |")
    conds = "classes cycled" if args.model == "fmnist-dit" else "prompts \"a photo of a <class name>\", classes cycled"
    lines += ["", f"{args.model}, {SAMPLER_NAMES.get(args.sampler, args.sampler)}-{out['steps']}, CFG {args.cfg:g}, {args.dtype}, {args.n} images (seeds 0..{args.n - 1}, "
              f"{conds}); FD vs real: the first {args.real} test images; measured speedup: median of {args.repeats} back-to-back pairs on {args.timed_batch} "
              f"images, {out['threads']} threads, {out['cpu']}. Shiva's ratios get one logit shift so that their mean "
              f"over these steps is the trained target exactly (the policy's own mean is shown beside it); token "
              f"counts are rounded to multiples of 8. "
              + (f"tome~X: ToMe (tomesd; attention and MLP merged in every block"
                 + ("; on the joint blocks the image tokens only, through hooks" if joint else "") + ") at "
                 f"the merge ratio whose speed came closest to X's in back-to-back pairs "
                 f"({max(len(v['probes']) for v in chosen.values()) if chosen else args.tome_probes} probes, merge "
                 f"ratio at most 0.74; "
                 + ", ".join(f"{k}: merge {v['ratio']:g}, time(Shiva) / time(ToMe) {v['shiva_over_tome_time']:.2f}"
                             for k, v in chosen.items()) + "). " if tomesd_ok else
                 "No ToMe row: tomesd does not run on these blocks. ")
              + f"Generated by `{command_of(args, tag)}`."]
    lines += ["", "Rounding the counts to multiples of 8, per artifact: block graphs a compiled generation needs "
              "(distinct token counts, the full one included) and the mean keep as run, against exact counts: "
              + "; ".join(f"{k}: {v['multiple_8']['graphs']} graphs at {v['multiple_8']['mean_keep']:.3f} vs "
                          f"{v['multiple_1']['graphs']} at {v['multiple_1']['mean_keep']:.3f}" for k, v in graphs.items()) + "."]
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")
    replace_block(stem, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
