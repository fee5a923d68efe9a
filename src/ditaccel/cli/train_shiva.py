"""``ditaccel train-shiva``: train Shiva's router and policy (and adapters) on a frozen DiT."""

from __future__ import annotations


HELP = ("train Shiva's token router and keep-ratio policy (and adapters) on a frozen DiT "
        "(class-conditional, or a bundled text model: captions as it was trained)")


def add_arguments(p) -> None:
    from ..methods.shiva.train import ADAPTERS, ShivaTrainConfig

    d = ShivaTrainConfig()
    p.add_argument("--model", default="fmnist-dit",
                   help="bundled model name or a diffusers pipeline folder trained on Fashion-MNIST "
                        "(28x28x1; 10 classes, or captions for text models; the training data) "
                        "(default %(default)s)")
    p.add_argument("--keep", type=float, default=d.keep, help="target mean keep ratio of the routed blocks")
    p.add_argument("--out", required=True,
                   help="run folder: checkpoint.{safetensors,json} (resumed when present) and the "
                        "artifact shiva.{safetensors,json}")
    p.add_argument("--stage-steps", default=f"{d.warmup_steps},{d.policy_steps},{d.joint_steps}",
                   help="steps of the three stages: router warm-up, policy learning, joint tuning")
    p.add_argument("--fixed-ratio", action="store_true",
                   help="keep the ratio at --keep everywhere (no policy learning): the ablation")
    p.add_argument("--adapter", default=d.adapter, choices=list(ADAPTERS))
    p.add_argument("--adapter-rank", type=int, default=d.adapter_rank)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--ckpt-every", type=int, default=d.ckpt_every)
    p.add_argument("--export-every", type=int, default=None,
                   help="also write the artifact of the run so far every this many steps, as "
                        "OUT/steps/shiva-STEP.{safetensors,json} (points of a training curve)")
    p.add_argument("--budget-gain", type=float, default=d.budget_gain,
                   help="integral term of the budget loss: holds the keep ratio's EMA at --keep "
                        "(0: the paper's loss alone)")
    p.add_argument("--lr-adapter", type=float, default=d.lr_adapter,
                   help="learning rate of the stage-3 adapters (default %(default)g)")
    p.add_argument("--stop-after", type=int, default=None,
                   help="stop after this many more steps (a checkpoint); run again to resume")


def run(args) -> int:
    from ..data import load_fashion_mnist
    from ..methods.shiva.train import ShivaTrainConfig, train_shiva
    from ..registry import load_pipeline

    try:
        stages = [int(v) for v in args.stage_steps.split(",")]
    except ValueError:
        stages = []
    if len(stages) != 3:
        raise ValueError(f"--stage-steps takes three integers like 150,150,150, got {args.stage_steps!r}")
    from ..pipeline import is_flow_config
    from ..sampling import is_text_pipeline

    pipe = load_pipeline(args.model, "fp32", args.device)
    cfg = ShivaTrainConfig(keep=args.keep, objective="flow" if is_flow_config(pipe.scheduler.config) else "epsilon", adaptive=not args.fixed_ratio, warmup_steps=stages[0],
                           policy_steps=stages[1], joint_steps=stages[2], adapter=args.adapter,
                           adapter_rank=args.adapter_rank, batch_size=args.batch_size, seed=args.seed,
                           ckpt_every=args.ckpt_every, budget_gain=args.budget_gain,
                           lr_adapter=args.lr_adapter)
    tf = pipe.transformer
    text = is_text_pipeline(pipe)
    shape = (tf.config.in_channels, tf.config.sample_size,
             10 if text else getattr(tf.config, "num_embeds_ada_norm", None))
    if shape != (1, 28, 10):
        raise ValueError(f"{args.model}: train-shiva trains on Fashion-MNIST, so the model must take 28x28x1 "
                         f"images with 10 classes or captions (this one: {shape[0]} channels, size {shape[1]}, "
                         f"{shape[2]} classes)")
    stem = train_shiva(tf, args.out, cfg, load_fashion_mnist("train"), stop_after=args.stop_after,
                       export_every=args.export_every)
    from .. import distributed as dist

    if dist.is_main():
        print(f"{'checkpoint' if stem.name == 'checkpoint' else 'Shiva artifact'} written to {stem}"
              f".{{safetensors,json}}")
    return 0
