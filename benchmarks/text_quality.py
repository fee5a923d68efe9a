"""Quality bar of the bundled text-conditioned models (issue 7), like benchmarks/quality.py for the
class-conditional DiT:

- class agreement: N samples for the evaluation prompts "a photo of a <class name>" (classes
  cycled, seeds 0..N-1), judged by the bundled classifier, and the Fréchet distance between them
  and the real test set (next to it: N real train images against the test set, what a perfect
  model would score at this N);
- held-out phrasings: prompts in templates that training never used (seeds 20000+);
- brightness: "a dark <name>" against "a light <name>" on the same seeds, mean garment brightness
  of each and how often the light one is the brighter (the attribute the captions carry).

    python benchmarks/text_quality.py --model fmnist-pixart
    python benchmarks/text_quality.py --model fmnist-mmdit

Writes benchmarks/results/text_quality_<model>.{json,md}, a sample grid, the loss curve, and the
README block ``text-quality-<model>``.
"""

from __future__ import annotations

import argparse
import json
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from common import RESULTS, replace_block  # noqa: E402
from ditaccel.captions import NAMES, class_named, eval_prompt, garment_brightness, render  # noqa: E402
from ditaccel.data import CLASS_NAMES, load_fashion_mnist  # noqa: E402
from ditaccel.metrics import feature_extractor, frechet_distance  # noqa: E402
from ditaccel.models.classifier import predict  # noqa: E402
from ditaccel.pipeline import SAMPLERS, default_sampler  # noqa: E402
from ditaccel.registry import ASSETS, BUNDLED, load_classifier_asset, load_pipeline  # noqa: E402
from ditaccel.sampling import sample  # noqa: E402
from ditaccel.viz import save_grid  # noqa: E402

HELD_OUT = ("a close-up of {a}", "someone's {x}", "{a} for sale", "my favourite {x}", "picture {a}, please")


def agreement(classifier, images, classes) -> tuple[float, torch.Tensor]:
    pred = predict(classifier, images * 2 - 1)
    target = torch.as_tensor(classes)
    return float((pred == target).float().mean()), pred


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, choices=[m for m in BUNDLED if m != "fmnist-dit"])
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--heldout-n", type=int, default=100)
    ap.add_argument("--pairs", type=int, default=5, help="dark/light pairs per class")
    ap.add_argument("--cfg", type=float, default=3.0)
    ap.add_argument("--sampler", default=None, choices=list(SAMPLERS))
    ap.add_argument("--steps", type=int, default=None)
    args = ap.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    pipe = load_pipeline(args.model, "fp32")
    sampler = args.sampler or default_sampler(pipe.scheduler)
    steps = args.steps or SAMPLERS[sampler][2]
    run = dict(sampler=sampler, steps=steps, guidance_scale=args.cfg, batch_size=100, progress=True)
    classifier = load_classifier_asset()
    fx = feature_extractor()
    x_test, _ = load_fashion_mnist("test")
    x_train, _ = load_fashion_mnist("train")
    test_feats = fx((x_test + 1) / 2)
    idx = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(0))[:args.n]
    real_fd = frechet_distance(fx((x_train[idx] + 1) / 2), test_feats)

    classes = [i % 10 for i in range(args.n)]
    images, stats = sample(pipe, classes, seed=0, **run)
    agree, pred = agreement(classifier, images, classes)
    target = torch.tensor(classes)
    per_class = {CLASS_NAMES[c]: float((pred[target == c] == c).float().mean()) for c in range(10)}
    fd = frechet_distance(fx(images), test_feats)
    order = torch.cat([torch.arange(c, min(args.n, 100), 10) for c in range(10)])
    save_grid(images[order], RESULTS / f"text_samples_{args.model}.png", nrow=len(order) // 10)
    print(json.dumps({"class_agreement": agree, "fd_vs_test": fd, "real_fd": real_fd}))

    prompts = [render(HELD_OUT[i % len(HELD_OUT)], NAMES[i % 10][(i // 10) % len(NAMES[i % 10])])
               for i in range(args.heldout_n)]
    held_classes = [class_named(p) for p in prompts]
    held_images, _ = sample(pipe, prompts, seed=20_000, **run)
    held_agree, _ = agreement(classifier, held_images, held_classes)
    print(json.dumps({"heldout_agreement": held_agree}))

    dark = [f"a photo of a dark {NAMES[c][0]}" for c in range(10) for _ in range(args.pairs)]
    light = [f"a photo of a light {NAMES[c][0]}" for c in range(10) for _ in range(args.pairs)]
    pair_classes = [c for c in range(10) for _ in range(args.pairs)]
    # same seeds for both: the pair differs in the word only
    dark_images, _ = sample(pipe, dark, seed=30_000, **run)
    light_images, _ = sample(pipe, light, seed=30_000, **run)
    bd, bl = garment_brightness(dark_images * 2 - 1), garment_brightness(light_images * 2 - 1)
    brighter = float((bl > bd).float().mean())
    pair_agree = agreement(classifier, torch.cat([dark_images, light_images]), pair_classes * 2)[0]
    print(json.dumps({"light_brighter": brighter, "dark_mean": bd.mean().item(), "light_mean": bl.mean().item()}))

    info = json.loads((ASSETS / BUNDLED[args.model]["folder"] / "training.json").read_text())
    log, tcfg = info["log"], info["train_config"]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.plot([r["step"] for r in log], [r["loss"] for r in log])
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (EMA 0.98)")
    ax.set_title(f"{args.model} training")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(RESULTS / f"training_loss_{args.model}.png", dpi=120)
    size_mb = sum(p.stat().st_size for p in (ASSETS / BUNDLED[args.model]["folder"]).rglob("*") if p.is_file()) / 2**20

    result = {"model": args.model, "sampler": sampler, "steps": steps, "cfg": args.cfg, "n": args.n,
              "class_agreement": agree, "per_class_agreement": per_class, "fd_vs_test": fd,
              "real_train_vs_test_fd": real_fd, "heldout_n": args.heldout_n, "heldout_agreement": held_agree,
              "heldout_prompts": prompts[:10], "pairs": len(dark), "light_brighter": brighter,
              "dark_brightness": bd.mean().item(), "light_brightness": bl.mean().item(),
              "pair_agreement": pair_agree, "train_steps": tcfg["steps"], "train_batch": tcfg["batch_size"],
              "train_minutes": log[-1]["elapsed_s"] / 60, "final_loss": log[-1]["loss"], "size_mb": size_mb,
              "warm_start": tcfg["warm_start"], "wall_s_per_image": stats.wall_s / args.n,
              "threads": torch.get_num_threads(), "total_s": time.time() - t0}
    (RESULTS / f"text_quality_{args.model}.json").write_text(json.dumps(result, indent=2) + "\n")
    worst = min(per_class, key=per_class.get)
    text = (f"**{args.model}** ({sampler}-{steps}, CFG {args.cfg:g}): class agreement "
            f"**{100 * agree:.1f}%** on {args.n} samples for \"{eval_prompt(0).replace('T-shirt', '<class>')}\" "
            f"(weakest class: {worst}, {100 * per_class[worst]:.0f}%); FD vs the test set {fd:.1f} "
            f"(real train images vs test at this N: {real_fd:.1f}). Phrasings never seen in training "
            f"(\"{HELD_OUT[0].format(a='a <name>')}\", \"{HELD_OUT[2].format(a='a <name>')}\", ...): "
            f"{100 * held_agree:.0f}% of {args.heldout_n}. \"dark\" vs \"light\" on the same seeds: the light one "
            f"is brighter in {100 * brighter:.0f}% of {len(dark)} pairs (mean garment value {bd.mean():.2f} vs "
            f"{bl.mean():.2f} in [-1, 1]), class agreement {100 * pair_agree:.0f}%. "
            f"Trained {tcfg['steps']} steps of batch {tcfg['batch_size']} from "
            f"{tcfg['warm_start'] or 'scratch'} in {log[-1]['elapsed_s'] / 60:.0f} min here, "
            f"final loss {log[-1]['loss']:.4f} ([curve](benchmarks/results/training_loss_{args.model}.png), "
            f"[samples](benchmarks/results/text_samples_{args.model}.png)); {size_mb:.1f} MB. "
            f"Generated by `python benchmarks/text_quality.py --model {args.model}`.")
    (RESULTS / f"text_quality_{args.model}.md").write_text(text + "\n")
    replace_block(f"text-quality-{args.model}", text)
    print(text)


if __name__ == "__main__":
    main()
