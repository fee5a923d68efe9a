"""Quality bar of the bundled reference DiT against real Fashion-MNIST.

For each sampler setting: generate N class-conditioned samples (classes cycled, seeds 0..N-1),
measure how many the bundled classifier assigns to their conditioning class, and the Fréchet
distance on EfficientNet-lite0 features between the samples and the real test set; next to it,
the same distance between N real *train* images and the test set (what a perfect model would
score at this N).

    python benchmarks/quality.py --cfg 3.0 --sweep 1.5,3.0,4.5   # what docs/ shows
    python benchmarks/quality.py --extra         # also DPM-Solver++-20 and DDPM-250 on fewer samples

``--sweep`` first measures classifier agreement for several guidance scales on ``--sweep-n``
samples (seeds 10000+, not the bar's seeds), so the scale used for the bar is shown next to the
others rather than picked silently.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from common import RESULTS, replace_block
from ditaccel.data import CLASS_NAMES, load_fashion_mnist
from ditaccel.metrics import classifier_agreement, feature_extractor, frechet_distance
from ditaccel.models.classifier import accuracy, predict
from ditaccel.registry import load_classifier_asset, load_pipeline
from ditaccel.sampling import sample
from ditaccel.viz import save_grid


def evaluate(pipe, sampler, steps, cfg, n, test_feats, classifier):
    labels = [i % 10 for i in range(n)]
    images, stats = sample(pipe, labels, sampler=sampler, steps=steps, guidance_scale=cfg,
                           seed=0, batch_size=100)
    target = torch.tensor(labels)
    pred = predict(classifier, images * 2 - 1)  # classify once; overall and per-class from it
    agree = float((pred == target).float().mean())
    fd = frechet_distance(feature_extractor()(images), test_feats)
    per_class = {CLASS_NAMES[c]: float((pred[target == c] == c).float().mean()) for c in range(10)}
    return images, {"sampler": sampler, "steps": steps, "cfg": cfg, "n": n,
                    "class_agreement": agree, "fd_vs_test": fd, "per_class_agreement": per_class,
                    "wall_s": stats.wall_s, "calls": stats.calls, "gflops": stats.flops / 1e9}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--cfg", type=float, default=1.5)
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--extra", action="store_true", help="also DPM-Solver++-20 and DDPM-250")
    ap.add_argument("--extra-n", type=int, default=200)
    ap.add_argument("--sweep", default="", help="comma-separated guidance scales to sweep first")
    ap.add_argument("--sweep-n", type=int, default=100)
    args = ap.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)

    t0 = time.time()
    pipe = load_pipeline("fmnist-dit", args.dtype)
    classifier = load_classifier_asset()
    x_test, y_test = load_fashion_mnist("test")
    x_train, _ = load_fashion_mnist("train")
    fx = feature_extractor()
    test_feats = fx((x_test + 1) / 2)
    g = torch.Generator().manual_seed(0)
    train_idx = torch.randperm(len(x_train), generator=g)[:args.n]
    real_fd = frechet_distance(fx((x_train[train_idx] + 1) / 2), test_feats)
    real_acc = accuracy(classifier, x_test, y_test)

    sweep = []
    for cfg in [float(c) for c in args.sweep.split(",") if c.strip()]:
        labels = [i % 10 for i in range(args.sweep_n)]
        images, _ = sample(pipe, labels, sampler="ddim", steps=50, guidance_scale=cfg, seed=10_000,
                           batch_size=100, count_flops=False)
        sweep.append({"cfg": cfg, "n": args.sweep_n,
                      "class_agreement": classifier_agreement(images, torch.tensor(labels), classifier)})
        print(json.dumps(sweep[-1]))

    settings = [("ddim", 50, args.n)]
    if args.extra:
        settings += [("dpm++", 20, args.extra_n), ("ddpm", 250, args.extra_n)]
    rows = []
    for sampler, steps, n in settings:
        images, row = evaluate(pipe, sampler, steps, args.cfg, n, test_feats, classifier)
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "per_class_agreement"}))
        if sampler == "ddim":
            order = torch.cat([torch.arange(c, 100, 10) for c in range(10)])  # rows = classes
            save_grid(images[order], RESULTS / "reference_samples.png", nrow=10)

    result = {"model": "fmnist-dit", "dtype": args.dtype, "real_train_vs_test_fd": real_fd,
              "real_train_n": args.n, "classifier_test_accuracy": real_acc, "runs": rows,
              "cfg_sweep": sweep,
              "python": platform.python_version(), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "total_s": time.time() - t0}
    (RESULTS / "quality.json").write_text(json.dumps(result, indent=2) + "\n")

    lines = ["| sampler | steps | CFG | samples | classifier agreement | FD vs real test | "
             "FD real train vs test (N={}) |".format(args.n),
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['sampler']} | {r['steps']} | {r['cfg']} | {r['n']} | "
                     f"{100 * r['class_agreement']:.1f}% | {r['fd_vs_test']:.2f} | {real_fd:.2f} |")
    lines.append("")
    if sweep:
        lines.append("Guidance sweep (DDIM-50, {} samples each, other seeds): ".format(args.sweep_n)
                     + ", ".join(f"CFG {r['cfg']:g}: {100 * r['class_agreement']:.0f}%" for r in sweep)
                     + ".")
        lines.append("")
    lines.append(f"The classifier itself scores {100 * real_acc:.1f}% on the real test set. "
                 "Fréchet distances use ImageNet EfficientNet-lite0 features (1280-d), "
                 "so their scale is not FID's. Generated by `python benchmarks/quality.py"
                 + f" --cfg {args.cfg:g}" + (f" --sweep {args.sweep}" if args.sweep else "")
                 + (" --extra" if args.extra else "") + "`.")
    table = "\n".join(lines)
    (RESULTS / "quality.md").write_text(table + "\n")
    replace_block("quality", table)
    print(table)


if __name__ == "__main__":
    main()
