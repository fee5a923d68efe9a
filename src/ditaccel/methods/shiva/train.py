"""Shiva training (Shiva-DiT, section 4) on a frozen DiT: class-conditional
(``DiTTransformer2DModel``) or text-conditioned (PixArt, SD3: the bundled text models, captions from
:mod:`ditaccel.captions` encoded by MiniLM-L6, as they were trained).

Loss per batch: ``L = L_diff + lambda_b L_budget + lambda_d L_distill``

- ``L_diff``: the model's own diffusion loss (epsilon prediction with Min-SNR weights, as the
  reference recipe, or rectified flow's velocity for flow-matching models, ``objective="flow"``)
  with every block but the first routed through the differentiable top-k;
- ``L_distill``: ``||LN(h_student) - LN(h_teacher)||^2`` after every ``distill_every``-th block plus
  the squared error of the output, teacher = the same frozen model run in full (adapters off);
- ``L_budget``: the EMA budget loss of :class:`.policy.Budget` (stages 2 and 3).

Three stages over one optimizer (its state is checkpointed with everything else):

1. router warm-up: the policy is off; the batch is split into ``ratio_groups`` groups, each with
   one keep ratio drawn from its own disjoint sub-range around the target (all layers alike);
2. policy learning: ratios from the policy with logit noise, budget loss with its EMA;
3. joint tuning: no noise; router, policy and DoRA (or LoRA) adapters on the blocks' attention
   and MLP linears (peft), the backbone otherwise frozen.

Timesteps are stratified over the batch.  Batches, noise and dropout are functions of (seed, step),
so a resumed run replays exactly what an uninterrupted run computes.  The result is an artifact
(:func:`save_shiva`): router, policy, a keep-ratio table over all training timesteps, adapters,
and the fingerprint of the model it belongs to.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ... import io
from ...models.reference import _batch_indices
from ...runtime.adapters import block_modules, find_blocks
from .policy import Budget, RatioPolicy
from .router import ShivaRouter
from .routing import TrainRouting

KIND = "shiva"
CHECKPOINT_KIND = "shiva-checkpoint"
ADAPTERS = ("dora", "lora", "none")


@dataclass(frozen=True)
class ShivaTrainConfig:
    keep: float = 0.6               # target mean keep ratio of the routed blocks
    adaptive: bool = True           # False: the keep ratio stays at ``keep`` everywhere (no policy learning)
    warmup_steps: int = 150         # stage 1
    policy_steps: int = 150         # stage 2
    joint_steps: int = 150          # stage 3
    batch_size: int = 32
    lr_router: float = 1e-3
    lr_policy: float = 3e-3
    lr_adapter: float = 3e-3        # at 1e-4 stage 3 barely moves the loss (docs/shiva.md)
    adapter: str = "dora"
    adapter_rank: int = 32
    budget_weight: float = 1.0
    budget_beta: float = 0.2
    budget_gain: float = 0.1        # integral term of the budget (0: the paper's EMA loss alone)
    distill_weight: float = 1.0
    distill_every: int = 4
    score_noise: float = 0.1        # exploration noise on the router scores (stages 1 and 2)
    logit_noise: float = 0.5        # noise on the policy's logits (stage 2)
    tau_rank: tuple[float, float] = (0.2, 0.1)   # annealed linearly from the first to the second
    tau_sel: tuple[float, float] = (0.1, 0.05)
    ratio_groups: int = 3
    multiple: int = 8               # token counts rounded to a multiple of this (few shapes)
    label_dropout: float = 0.1      # class label or caption dropped (classifier-free guidance)
    min_snr_gamma: float = 5.0
    objective: str = "epsilon"      # or "flow" (rectified flow, SD3): what the frozen model predicts
    grad_clip: float = 1.0
    seed: int = 0
    ckpt_every: int = 25

    def __post_init__(self):
        if not 0 < self.keep < 1:
            raise ValueError(f"keep must be in (0, 1), got {self.keep}; 1 would route nothing")
        for name in ("warmup_steps", "policy_steps", "joint_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.total_steps < 1:
            raise ValueError("train at least one step (warmup_steps + policy_steps + joint_steps >= 1)")
        for name in ("batch_size", "ckpt_every", "distill_every", "ratio_groups", "multiple", "adapter_rank"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.adapter not in ADAPTERS:
            raise ValueError(f"adapter must be one of {', '.join(ADAPTERS)}, got {self.adapter!r}")
        if self.objective not in ("epsilon", "flow"):
            raise ValueError(f"objective must be 'epsilon' or 'flow', got {self.objective!r}")
        if self.batch_size < self.ratio_groups:
            raise ValueError(f"batch_size ({self.batch_size}) must be at least ratio_groups ({self.ratio_groups})")

    @property
    def total_steps(self) -> int:
        return self.warmup_steps + self.policy_steps + self.joint_steps

    def stage(self, step: int) -> int:
        return 1 if step < self.warmup_steps else 2 if step < self.warmup_steps + self.policy_steps else 3

    def temperatures(self, step: int) -> tuple[float, float]:
        f = step / max(1, self.total_steps - 1)
        return tuple(a + f * (b - a) for a, b in (self.tau_rank, self.tau_sel))

    @classmethod
    def from_dict(cls, d: dict) -> ShivaTrainConfig:
        known = {f.name for f in fields(cls)}
        d = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in known}
        return cls(**d)


def group_ratios(cfg: ShivaTrainConfig, batch: int, gen: torch.Generator) -> torch.Tensor:
    """Stage 1's fixed keep ratios (batch,): the batch in ``ratio_groups`` contiguous groups, each
    with one ratio drawn from its own disjoint sub-range of [keep - 0.3, keep + 0.3] (within
    [0.1, 1])."""
    lo, hi = max(0.1, cfg.keep - 0.3), min(1.0, cfg.keep + 0.3)
    g = cfg.ratio_groups
    width = (hi - lo) / g
    picks = lo + width * (torch.arange(g, dtype=torch.float64) + torch.rand(g, generator=gen, dtype=torch.float64))
    sizes = [batch // g + (1 if i < batch % g else 0) for i in range(g)]
    return torch.cat([picks[i].repeat(s) for i, s in enumerate(sizes)]).float()


def stratified_timesteps(batch: int, num_train_timesteps: int, gen: torch.Generator) -> torch.Tensor:
    """One timestep per equal stratum of [0, T), in random order."""
    u = (torch.arange(batch, dtype=torch.float64) + torch.rand(batch, generator=gen, dtype=torch.float64)) / batch
    t = (u * num_train_timesteps).long().clamp(max=num_train_timesteps - 1)
    return t[torch.randperm(batch, generator=gen)]


def adapter_targets(transformer: torch.nn.Module) -> list[str]:
    """Full names of the linears inside every block's attention / cross-attention / MLP: where the
    stage-3 adapters go (derived from the block registry, so any supported block works)."""
    names = {id(m): n for n, m in transformer.named_modules()}
    out = []
    for _, block, spec in find_blocks(transformer):
        for module in block_modules(block, spec).values():
            out += [names[id(m)] for m in module.modules() if isinstance(m, torch.nn.Linear)]
    return out


def _tuner_layers(transformer):
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in transformer.modules() if isinstance(m, BaseTunerLayer)]


def inject_adapters(transformer, kind: str, rank: int, targets: list[str] | None = None) -> None:
    """DoRA or LoRA adapters (peft) on ``targets`` (default :func:`adapter_targets`)."""
    from peft import LoraConfig, inject_adapter_in_model

    cfg = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, use_dora=kind == "dora",
                     target_modules=targets if targets is not None else adapter_targets(transformer))
    inject_adapter_in_model(cfg, transformer)


def set_adapters(transformer, on: bool) -> None:
    for layer in _tuner_layers(transformer):
        layer.enable_adapters(on)


def adapter_state(transformer) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(transformer).items()}


class ShivaTrainer:
    """State of one training run: the frozen model with its routing, router, policy, budget and
    optimizer.  ``data`` = (images in [-1, 1] (N, C, H, W), labels (N,))."""

    def __init__(self, transformer, cfg: ShivaTrainConfig, data: tuple[torch.Tensor, torch.Tensor]):
        from diffusers import DDPMScheduler

        from ...models.reference import NOISE_SCHEDULE

        from ...pipeline import TEXT_CALLS

        name = type(transformer).__name__
        if name != "DiTTransformer2DModel" and name not in TEXT_CALLS:
            raise ValueError(f"train-shiva trains DiTTransformer2DModel (class labels) or "
                             f"{', '.join(TEXT_CALLS)} (captions); got {name}")
        self.cfg, self.transformer = cfg, transformer
        self.x, self.y = data
        self.bank = None
        if name in TEXT_CALLS:
            from ...models.text_reference import CaptionBank

            self.bank = CaptionBank(self.x, self.y)
        if self.x.shape[0] < cfg.batch_size:
            raise ValueError(f"the data has {self.x.shape[0]} images, fewer than batch_size={cfg.batch_size}")
        from ... import distributed as dist

        self.dist = dist
        if cfg.batch_size % dist.size():
            raise ValueError(f"batch_size={cfg.batch_size} does not split over {dist.size()} processes; "
                             "use a multiple of the process count")
        per = cfg.batch_size // dist.size()  # data parallel: this process's rows of every batch
        self.rows = slice(dist.rank() * per, (dist.rank() + 1) * per)
        self.fingerprint = io.model_fingerprint(transformer)  # of the base model, before adapters
        self.noise_sched = DDPMScheduler(**NOISE_SCHEDULE)
        transformer.requires_grad_(False)
        transformer.train()
        for m in transformer.modules():
            # diffusers' LabelEmbedding drops labels by itself in train mode, with a fresh draw per
            # pass: the teacher and the student would see different labels.  Label dropout is
            # done once per batch here (cfg.label_dropout), for both passes.
            if type(m).__name__ == "LabelEmbedding":
                m.eval()
        torch.manual_seed(cfg.seed)
        # where the model is; every random draw is made on the CPU (the same on any device) and moved
        self.device = transformer.device
        self.router = ShivaRouter.for_model(transformer).to(self.device)
        self.blocks = find_blocks(transformer)
        self.policy = RatioPolicy(len(self.blocks), cfg.keep).to(self.device)
        self.budget = Budget(cfg.keep, beta=cfg.budget_beta, weight=cfg.budget_weight, gain=cfg.budget_gain)
        self.adapter_params: list[torch.nn.Parameter] = []
        self.adapter_targets: list[str] = []
        if cfg.adapter != "none":
            self.adapter_targets = adapter_targets(transformer)
            inject_adapters(transformer, cfg.adapter, cfg.adapter_rank)
            self.adapter_params = [p for n, p in transformer.named_parameters() if "lora_" in n]
        groups = [{"params": list(self.router.parameters()), "lr": cfg.lr_router},
                  {"params": list(self.policy.parameters()), "lr": cfg.lr_policy}]
        if self.adapter_params:
            groups.append({"params": self.adapter_params, "lr": cfg.lr_adapter})
        self.opt = torch.optim.AdamW(groups, weight_decay=0.0)
        self.step, self.log = 0, []
        self.distilled = [i for i in range(len(self.blocks)) if (i + 1) % cfg.distill_every == 0]
        self._hidden: dict[int, torch.Tensor] = {}
        self._handles = [block.register_forward_hook(self._keep_hidden(i, spec))
                         for i, (_, block, spec) in enumerate(self.blocks) if i in self.distilled]

    def _keep_hidden(self, layer, spec):
        def hook(module, args, output):
            self._hidden[layer] = output if spec.image_output is None else output[spec.image_output]
        return hook

    def close(self) -> None:
        for h in self._handles:
            h.remove()

    # -- one step -------------------------------------------------------------------------------
    def _forward(self, xt, t, cond):
        self._hidden = {}
        if self.bank is None:
            out = self.transformer(xt, timestep=t, class_labels=cond).sample
        else:
            from ...pipeline import text_call_kwargs

            out = self.transformer(xt, timestep=t, **text_call_kwargs(self.transformer, cond)).sample
        return out, dict(self._hidden)

    def loss(self, step: int) -> tuple[torch.Tensor, dict]:
        cfg = self.cfg
        stage = cfg.stage(step)
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        torch.manual_seed(cfg.seed * 7_919 + step)  # the score noise inside the top-k
        idx = _batch_indices(cfg, step, self.x.shape[0])  # the reference recipe's replayable order
        x0, labels = self.x[idx], self.y[idx]
        b = x0.shape[0]
        t = stratified_timesteps(b, self.noise_sched.config.num_train_timesteps, gen)
        noise = torch.randn(x0.shape, generator=gen)
        if self.bank is None:
            drop = torch.rand(b, generator=gen) < cfg.label_dropout
            labels = torch.where(drop, self.transformer.config.num_embeds_ada_norm, labels)
        else:  # "labels" become the drawn captions' embeddings (the empty caption when dropped)
            labels = self.bank.emb.index(self.bank.draw(idx, cfg.label_dropout, gen))
        if cfg.objective == "epsilon":
            xt, target = self.noise_sched.add_noise(x0, noise, t), noise
        else:  # rectified flow: x_t = (1 - s) x0 + s noise, velocity noise - x0, timestep s * T
            s = (t.double() + 0.5) / self.noise_sched.config.num_train_timesteps
            xt = ((1 - s).view(-1, 1, 1, 1) * x0 + s.view(-1, 1, 1, 1) * noise).float()
            target = noise - x0
            t = (s * self.noise_sched.config.num_train_timesteps).float()
        group = group_ratios(cfg, b, gen) if stage == 1 else None
        alphas_all = self.noise_sched.alphas_cumprod[t] if cfg.objective == "epsilon" else None
        # everything above was drawn for the whole batch; this process computes its rows, on its device
        dev, rows = self.device, self.rows
        t_all = t.to(dev)
        xt, target, t = xt[rows].to(dev), target[rows].to(dev), t[rows].to(dev)
        labels = (labels[rows] if torch.is_tensor(labels) else labels.index(rows)).to(dev)
        b_all, b = b, xt.shape[0]
        routing = self.routing
        routing.rows, routing.global_batch = rows, b_all
        with torch.no_grad():  # the teacher: the frozen model in full
            routing.enabled = False
            set_adapters(self.transformer, False)
            teacher, teacher_hidden = self._forward(xt, t, labels)
        routing.enabled = True
        set_adapters(self.transformer, stage == 3)
        if stage == 1:
            ratios = torch.cat([torch.ones(b, 1), group[rows, None].expand(b, len(self.blocks) - 1)], dim=1).to(dev)
        elif not cfg.adaptive:  # the fixed-ratio variant: the policy stays at its starting value
            ratios = self.policy(t.float()).detach()
        else:  # (the logit noise is drawn for the whole batch)
            ratios = self.policy(t_all.float(), noise_std=cfg.logit_noise if stage == 2 else 0.0)[rows]
        routing.ratios = ratios
        routing.noise_std = cfg.score_noise if stage < 3 else 0.0
        routing.tau_rank, routing.tau_sel = cfg.temperatures(step)
        pred, hidden = self._forward(xt, t, labels)
        per_sample = (pred.float() - target).pow(2).mean(dim=(1, 2, 3))
        if cfg.objective == "epsilon":
            alphas = alphas_all[rows].to(dev)
            snr = alphas / (1 - alphas)
            l_diff = (snr.clamp(max=cfg.min_snr_gamma) / snr * per_sample).mean()
        else:
            l_diff = per_sample.mean()
        l_distill = (pred.float() - teacher.float()).pow(2).mean()
        for layer in self.distilled:
            hs, ht = hidden[layer].float(), teacher_hidden[layer].float()
            l_distill = l_distill + (F.layer_norm(hs, hs.shape[-1:]) - F.layer_norm(ht, ht.shape[-1:])).pow(2).mean()
        l_budget = (self.budget.loss(ratios, sync=self.dist.all_mean) if stage >= 2 and cfg.adaptive
                    else torch.zeros((), device=dev))
        loss = l_diff + cfg.distill_weight * l_distill + l_budget
        logged = self.dist.all_mean(torch.stack([loss.detach(), l_diff.detach(), l_distill.detach(),
                                                 ratios[:, 1:].mean().detach()]).double()).tolist()
        return loss, {"stage": stage, "loss": logged[0], "diff": logged[1], "distill": logged[2],
                      "keep": logged[3], "ema_keep": self.budget.mu}

    def train_step(self) -> dict:
        cfg = self.cfg
        stage = cfg.stage(self.step)
        for p in self.adapter_params:
            p.requires_grad_(stage == 3)
        self.policy.requires_grad_(stage >= 2 and cfg.adaptive)
        loss, parts = self.loss(self.step)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.dist.size() > 1:
            self._average_gradients()
        params = [p for g in self.opt.param_groups for p in g["params"] if p.grad is not None]
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        self.opt.step()
        self.step += 1
        return parts

    def _average_gradients(self) -> None:
        """Data parallel: every gradient becomes its mean over the processes (one all-reduce of
        all of them, with a mask so that a parameter no process gave a gradient keeps none, as
        in a single-process run)."""
        params = [p for g in self.opt.param_groups for p in g["params"] if p.requires_grad]
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).double()
                          for p in params] + [torch.tensor([float(p.grad is not None) for p in params],
                                                           dtype=torch.float64, device=params[0].device)])
        flat = self.dist.all_sum(flat)
        mask, at = flat[-len(params):], 0
        for p, m in zip(params, mask.tolist()):
            n = p.numel()
            p.grad = None if m == 0 else (flat[at:at + n] / self.dist.size()).view_as(p).to(p.dtype)
            at += n

    # -- checkpoints ----------------------------------------------------------------------------
    def _tensors(self) -> dict[str, torch.Tensor]:
        tensors = {f"router.{k}": v for k, v in self.router.state_dict().items()}
        tensors.update({f"policy.{k}": v for k, v in self.policy.state_dict().items()})
        if self.adapter_params:
            tensors.update({f"adapter.{k}": v for k, v in adapter_state(self.transformer).items()})
        return tensors

    def save_checkpoint(self, stem: Path) -> None:
        opt_tensors, groups = io.optimizer_tensors(self.opt)
        io.save_artifact(stem, CHECKPOINT_KIND, {**self._tensors(), **opt_tensors},
                         {"step": self.step, "config": asdict(self.cfg), "fingerprint": self.fingerprint,
                          "budget": self.budget.state_dict(), "param_groups": groups, "log": self.log})

    def load_checkpoint(self, stem: Path) -> None:
        from peft import set_peft_model_state_dict

        tensors, meta = io.load_artifact(stem, CHECKPOINT_KIND)
        if meta.get("fingerprint") != self.fingerprint:
            raise io.ArtifactError(f"{stem}: the checkpoint is for another model (fingerprint differs); "
                                   "use a new --out for this model")
        saved = ShivaTrainConfig.from_dict(meta["config"])
        changed = [f.name for f in fields(ShivaTrainConfig)
                   if f.name not in ("ckpt_every",) and getattr(saved, f.name) != getattr(self.cfg, f.name)]
        if changed:
            raise ValueError(f"{stem}: the checkpoint was trained with other settings ({', '.join(changed)}); "
                             "pass the same values to resume, or a new --out")
        self.router.load_state_dict({k[7:]: v for k, v in tensors.items() if k.startswith("router.")})
        self.policy.load_state_dict({k[7:]: v for k, v in tensors.items() if k.startswith("policy.")})
        if self.adapter_params:
            set_peft_model_state_dict(self.transformer, {k[8:]: v for k, v in tensors.items()
                                                         if k.startswith("adapter.")})
        io.load_optimizer(self.opt, tensors, meta["param_groups"])
        self.budget.load_state_dict(meta["budget"])
        self.step, self.log = int(meta["step"]), list(meta["log"])

    # -- the run ----------------------------------------------------------------------------------
    def run(self, out_dir: Path, progress: bool = True, stop_after: int | None = None,
            export_every: int | None = None) -> Path:
        """Train to the end (or ``stop_after`` steps more), checkpointing to ``out_dir/checkpoint``;
        at the end writes the artifact ``out_dir/shiva`` and returns its stem.  ``export_every``:
        also write the artifact of the run so far as ``out_dir/steps/shiva-{step:06d}`` at every
        multiple of that many steps (a training curve's points)."""
        if export_every is not None and export_every < 1:
            raise ValueError(f"export_every must be >= 1, got {export_every}")
        out_dir = Path(out_dir)
        ckpt = out_dir / "checkpoint"
        if io.artifact_exists(ckpt):
            self.load_checkpoint(ckpt)
        cfg = self.cfg
        end = cfg.total_steps if stop_after is None else min(cfg.total_steps, self.step + stop_after)
        bar = tqdm(total=cfg.total_steps, initial=self.step, desc="train-shiva",
                   disable=not progress or not self.dist.is_main())
        t0 = time.time() - (self.log[-1].get("elapsed_s", 0.0) if self.log else 0.0)
        running = None
        with TrainRouting(self.transformer, self.router, multiple=cfg.multiple) as routing:
            self.routing = routing
            while self.step < end:
                parts = self.train_step()
                running = parts if running is None else {k: (0.9 * running[k] + 0.1 * v) if k != "stage" else v
                                                         for k, v in parts.items()}
                bar.update(1)
                bar.set_postfix(stage=parts["stage"], loss=f"{running['loss']:.4f}", keep=f"{parts['keep']:.2f}")
                if self.step % cfg.ckpt_every == 0 or self.step == end:
                    self.log.append({"step": self.step, **{k: round(v, 5) for k, v in running.items()},
                                     "elapsed_s": round(time.time() - t0, 1)})
                    if self.dist.is_main():  # one writer; every process holds the same state
                        self.save_checkpoint(ckpt)
                if export_every and self.step % export_every == 0 and self.dist.is_main():
                    save_shiva(out_dir / "steps" / f"shiva-{self.step:06d}", self)
        bar.close()
        if self.step < cfg.total_steps:
            self.dist.barrier()
            return ckpt
        stem = out_dir / "shiva"
        if self.dist.is_main():
            save_shiva(stem, self)
        self.dist.barrier()
        return stem


def ratio_table(policy: RatioPolicy, num_train_timesteps: int = 1000) -> torch.Tensor:
    """The policy compiled to a lookup table: keep ratios (T, L) at every training timestep."""
    with torch.no_grad():
        t = torch.arange(num_train_timesteps, dtype=torch.float32, device=policy.anchor.device)
        return policy(t).float().cpu()


def save_shiva(stem: Path, trainer: ShivaTrainer) -> None:
    """The inference artifact: router, policy, its ratio table, adapters, model fingerprint."""
    tensors = trainer._tensors()
    tensors["ratio_table"] = ratio_table(trainer.policy, trainer.noise_sched.config.num_train_timesteps)
    tf = trainer.transformer
    meta = {"fingerprint": trainer.fingerprint, "model_class": type(tf).__name__,
            "num_layers": len(trainer.blocks), "keep": trainer.cfg.keep, "adapter": trainer.cfg.adapter,
            "adapter_rank": trainer.cfg.adapter_rank, "adapter_targets": trainer.adapter_targets,
            "multiple": trainer.cfg.multiple, "config": asdict(trainer.cfg), "log": trainer.log,
            "router": {"share": trainer.router.share, "bottleneck": trainer.router.proj_x[0].out_features,
                       "t_dim": trainer.router.t_dim}}
    io.save_artifact(stem, KIND, tensors, meta)


def train_shiva(transformer, out_dir, cfg: ShivaTrainConfig, data, progress: bool = True,
                stop_after: int | None = None, export_every: int | None = None) -> Path:
    """Train (or resume) Shiva on ``transformer`` (frozen; adapters are added to it in place when
    ``cfg.adapter`` is not "none"); returns the artifact stem (or the checkpoint's, when stopped
    early by ``stop_after``).  ``data``: (images in [-1, 1] (N, C, H, W), class labels (N,)).
    Running it again on the same ``out_dir`` resumes from its checkpoint.  ``export_every``: also
    keep the artifact of every that many steps under ``out_dir/steps`` (see :meth:`ShivaTrainer.run`).

    Example::

        from ditaccel.data import load_fashion_mnist
        stem = ditaccel.train_shiva(pipe.transformer, "runs/shiva", ShivaTrainConfig(keep=0.6),
                                    load_fashion_mnist("train"))
    """
    trainer = ShivaTrainer(transformer, cfg, data)
    try:
        return trainer.run(Path(out_dir), progress=progress, stop_after=stop_after, export_every=export_every)
    finally:
        trainer.close()
