"""What a Shiva training iteration costs against a plain one (the paper: 1.07x), on the
bundled DiT, at the same batch, fp32 (what ``ditaccel train-shiva`` runs), interleaved.

- ``plain, full fine-tune``: the diffusion loss (Min-SNR, as the reference recipe), forward and
  backward through the whole model, AdamW over every weight;
- ``plain, DoRA``: the same with the backbone frozen and the DoRA adapters Shiva's stage 3 tunes;
- ``shiva stage 1 / 2 / 3``: :meth:`ShivaTrainer.train_step` in each stage (teacher forward in
  full without gradients, routed student forward and backward through the differentiable
  top-k, router / policy / adapter updates).

Each iteration is timed alone; rows alternate between a plain and a Shiva iteration; the first
iterations of each kind are dropped (warm-up); medians.  Rewrites its page's ``shiva-train-cost``
block.

    python benchmarks/shiva_train_cost.py [--iters 8 --batch 32 --keep 0.6]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F

from common import machine, replace_block, save_json
from ditaccel.data import load_fashion_mnist
from ditaccel.methods.shiva.train import ShivaTrainConfig, ShivaTrainer, inject_adapters
from ditaccel.registry import load_pipeline


def plain_step(model, opt, params, x, y, noise_sched, gen) -> None:
    b = x.shape[0]
    t = torch.randint(0, noise_sched.config.num_train_timesteps, (b,), generator=gen)
    noise = torch.randn(x.shape, generator=gen)
    xt = noise_sched.add_noise(x, noise, t)
    pred = model(xt, timestep=t, class_labels=y).sample
    per_sample = F.mse_loss(pred.float(), noise, reduction="none").mean(dim=(1, 2, 3))
    alphas = noise_sched.alphas_cumprod[t]
    snr = alphas / (1 - alphas)
    loss = (snr.clamp(max=5.0) / snr * per_sample).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()


def main() -> None:
    from diffusers import DDPMScheduler

    from ditaccel.models.reference import NOISE_SCHEDULE

    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=8, help="timed iterations per row (after 2 warm-up ones)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--keep", type=float, default=0.6)
    args = ap.parse_args()
    data = load_fashion_mnist("train")
    base = load_pipeline("fmnist-dit", "fp32").transformer
    noise_sched = DDPMScheduler(**NOISE_SCHEDULE)
    gen = torch.Generator().manual_seed(0)
    x, y = data[0][: args.batch], data[1][: args.batch]

    full = copy.deepcopy(base).train().requires_grad_(True)
    full_params = list(full.parameters())
    full_opt = torch.optim.AdamW(full_params, lr=1e-4)
    dora = copy.deepcopy(base).train().requires_grad_(False)
    inject_adapters(dora, "dora", 32)
    dora_params = [p for n, p in dora.named_parameters() if "lora_" in n]
    for p in dora_params:
        p.requires_grad_(True)
    dora_opt = torch.optim.AdamW(dora_params, lr=1e-4)
    plain = {"plain, full fine-tune": lambda: plain_step(full, full_opt, full_params, x, y, noise_sched, gen),
             "plain, DoRA": lambda: plain_step(dora, dora_opt, dora_params, x, y, noise_sched, gen)}

    per_stage = args.iters + 2
    cfg = ShivaTrainConfig(keep=args.keep, warmup_steps=per_stage, policy_steps=per_stage, joint_steps=per_stage,
                           batch_size=args.batch, ckpt_every=10_000)
    shiva_tf = copy.deepcopy(base)
    trainer = ShivaTrainer(shiva_tf, cfg, data)
    times: dict[str, list[float]] = {name: [] for name in (*plain, "shiva stage 1", "shiva stage 2", "shiva stage 3")}
    from ditaccel.methods.shiva.routing import TrainRouting

    with TrainRouting(shiva_tf, trainer.router, multiple=cfg.multiple) as routing:
        trainer.routing = routing
        for i in range(3 * per_stage):
            stage = cfg.stage(trainer.step)
            name = list(plain)[i % 2]
            t0 = time.perf_counter()
            plain[name]()
            dt_plain = time.perf_counter() - t0
            t0 = time.perf_counter()
            trainer.train_step()
            dt_shiva = time.perf_counter() - t0
            if i % per_stage >= 2:  # drop each stage's first two (warm-up, a new stage's first step)
                times[name].append(dt_plain)
                times[f"shiva stage {stage}"].append(dt_shiva)
            print(f"{i}: {name} {dt_plain:.2f} s, shiva stage {stage} {dt_shiva:.2f} s", flush=True)
    trainer.close()
    med = {k: statistics.median(v) for k, v in times.items()}
    ref_full, ref_dora = med["plain, full fine-tune"], med["plain, DoRA"]
    out = {"machine": machine(), "threads": torch.get_num_threads(), "batch": args.batch, "keep": args.keep,
           "dtype": "fp32", "times": times, "median_s": med,
           "relative_to_full_fine_tune": {k: v / ref_full for k, v in med.items()},
           "relative_to_dora": {k: v / ref_dora for k, v in med.items()}}
    save_json("shiva_train_cost", out)
    lines = ["| iteration | seconds | vs plain full fine-tune | vs plain DoRA |", "|---|---|---|---|"]
    lines += [f"| {k} | {v:.2f} | {v / ref_full:.2f}x | {v / ref_dora:.2f}x |" for k, v in med.items()]
    lines += ["", f"Bundled DiT, batch {args.batch}, fp32, keep target {args.keep}, {torch.get_num_threads()} threads on "
              f"{machine()}; median of {args.iters} iterations per row, plain and Shiva iterations alternating. "
              "Every Shiva iteration also runs the frozen teacher in full (no gradients) for the distillation "
              "loss. Generated by `python benchmarks/shiva_train_cost.py`."]
    table = "\n".join(lines)
    replace_block("shiva-train-cost", table)
    print(table)


if __name__ == "__main__":
    main()
