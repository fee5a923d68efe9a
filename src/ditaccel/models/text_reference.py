"""The bundled text-conditioned reference models, trained here on Fashion-MNIST with captions
(:mod:`ditaccel.captions`) encoded by MiniLM-L6 (:mod:`ditaccel.text`):

- ``fmnist-pixart``: diffusers ``PixArtTransformer2DModel`` (adaLN-single, cross-attention to the
  text tokens), epsilon prediction on the linear DDPM schedule, as PixArt-alpha.
- ``fmnist-mmdit``: diffusers ``SD3Transformer2DModel`` (joint attention over image and text
  tokens, pooled text in the adaLN), rectified flow as SD3: velocity prediction, logit-normal
  timesteps, sampled with FlowMatchEulerDiscrete.

Both are 28x28x1 pixels, patch 2 (196 image tokens), 8 layers, width 192, like the class-conditional
reference DiT (:mod:`ditaccel.models.reference`), and both start from its weights: PixArt-alpha's
own recipe trains the class-conditional model first and then re-parameterises its adaLN for text
(Chen et al. 2023, sec. 2.3).  What is copied and what starts fresh is in :func:`warm_start`; the
text paths start at zero, so at step 0 each model computes what the DiT computes for the null
class.  Captions are dropped to the empty prompt 10% of the time for classifier-free guidance.
"""

from __future__ import annotations

import functools
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import (DDIMScheduler, DDPMScheduler, DiTTransformer2DModel,
                       FlowMatchEulerDiscreteScheduler, PixArtTransformer2DModel,
                       SD3Transformer2DModel)
from tqdm.auto import tqdm

from .. import io
from ..captions import brightness_tertiles, caption_table
from ..data import load_fashion_mnist
from ..text import HIDDEN, TextEmbeddings, encode, load_text_encoder
from .reference import (NOISE_SCHEDULE, _batch_indices, _load_checkpoint, _lr_at, _save_checkpoint,
                        train_update)

FLOW_SCHEDULE = dict(num_train_timesteps=1000, shift=1.0)

# Presets are data: name -> (diffusers class, config, objective).
PRESETS: dict[str, tuple[type, dict, str]] = {
    "fmnist-pixart": (PixArtTransformer2DModel, dict(
        num_attention_heads=3, attention_head_dim=64, in_channels=1, out_channels=1, num_layers=8,
        cross_attention_dim=192, sample_size=28, patch_size=2, caption_channels=HIDDEN,
        use_additional_conditions=False, norm_num_groups=1, activation_fn="gelu-approximate"), "epsilon"),
    "fmnist-mmdit": (SD3Transformer2DModel, dict(
        sample_size=28, patch_size=2, in_channels=1, out_channels=1, num_layers=8, attention_head_dim=64,
        num_attention_heads=3, joint_attention_dim=HIDDEN, caption_projection_dim=192,
        pooled_projection_dim=HIDDEN, pos_embed_max_size=14), "flow"),
}


@dataclass(frozen=True)
class TextTrainConfig:
    preset: str = "fmnist-pixart"
    steps: int = 800
    batch_size: int = 64
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    ema_decay: float = 0.999
    caption_dropout: float = 0.1
    min_snr_gamma: float = 5.0   # epsilon objective only
    grad_clip: float = 1.0
    warm_start: str | None = "fmnist-dit"  # a class-conditional DiT (name or folder), or None
    seed: int = 0
    ckpt_every: int = 50

    def __post_init__(self):
        from .reference import check_training

        check_training(self, PRESETS, "caption_dropout")

    @property
    def objective(self) -> str:
        return PRESETS[self.preset][2]


def build_transformer(preset: str):
    cls, config, _ = PRESETS[preset]
    return cls(**config)


@torch.no_grad()
def _dit_modulations(dit: DiTTransformer2DModel, n_t: int = 1000):
    """The DiT's null-class adaLN outputs over every timestep: features S (T, D) = SiLU of block
    0's conditioning, targets per block (n, T, 6D), and the output layer's (shift, scale) (T, 2D)."""
    t = torch.arange(n_t)
    null = torch.full((n_t,), dit.config.num_embeds_ada_norm)
    conds = [blk.norm1.emb(t, null, hidden_dtype=torch.float32) for blk in dit.transformer_blocks]
    feats = F.silu(conds[0])
    targets = torch.stack([blk.norm1.linear(F.silu(c)) for blk, c in zip(dit.transformer_blocks, conds)])
    out = dit.proj_out_1(feats)
    return conds[0], feats, targets, out


def _fit(feats: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares (W, b) with targets ~ feats @ W.T + b."""
    x = torch.cat([feats, torch.ones(len(feats), 1)], dim=1).double()
    sol = torch.linalg.lstsq(x, targets.double()).solution.float()
    return sol[:-1].T.contiguous(), sol[-1].contiguous()


@torch.no_grad()
def warm_start(model, dit: DiTTransformer2DModel) -> list[str]:
    """Copy a class-conditional DiT of the same width and depth into ``model``; returns the
    parameter names that start fresh.

    Copied: the patch embedding, every block's self-attention and MLP, the timestep embedder
    (block 0's, with the DiT's null-class embedding folded into its bias), the output projection.
    The DiT gives every block its own timestep and class embedding; the new models share one, so
    the adaLN weights are fitted by least squares to reproduce the DiT's null-class modulation of
    each block at every timestep from the shared embedding: PixArt's adaLN-single (one linear for
    all blocks, a scale-shift table per block), SD3's per-block adaLN linears.  Cross-attention's
    output (PixArt), the pooled-text embedder's last layer and the text values (SD3) start at zero.
    """
    sd = {k: v.clone() for k, v in dit.state_dict().items()}
    n = len(dit.transformer_blocks)
    width = sd["pos_embed.proj.weight"].shape[0]
    if len(model.transformer_blocks) != n or model.pos_embed.proj.weight.shape[0] != width:
        raise ValueError(f"warm start needs a DiT of the same depth and width as the model "
                         f"({len(model.transformer_blocks)} layers, width {model.pos_embed.proj.weight.shape[0]}); "
                         f"this one has {n} layers, width {width}")
    null = sd["transformer_blocks.0.norm1.emb.class_embedder.embedding_table.weight"][-1]
    temb = {k.split("timestep_embedder.")[1]: v for k, v in sd.items()
            if k.startswith("transformer_blocks.0.norm1.emb.timestep_embedder.")}
    temb["linear_2.bias"] = temb["linear_2.bias"] + null
    new: dict[str, torch.Tensor] = {"pos_embed.proj.weight": sd["pos_embed.proj.weight"],
                                    "pos_embed.proj.bias": sd["pos_embed.proj.bias"],
                                    "proj_out.weight": sd["proj_out_2.weight"],
                                    "proj_out.bias": sd["proj_out_2.bias"]}
    b0 = sd["transformer_blocks.0.norm1.linear.bias"]
    cond0, feats, targets, dit_out = _dit_modulations(dit)
    if isinstance(model, PixArtTransformer2DModel):
        w_shared, _ = _fit(feats, targets.mean(0))
        b_shared = torch.zeros_like(b0)

        def shared(f):
            return f @ w_shared.T + b_shared
    for i in range(n):
        src = f"transformer_blocks.{i}."
        for part in ("to_q", "to_k", "to_v", "to_out.0"):
            for wb in ("weight", "bias"):
                dst = "attn1" if isinstance(model, PixArtTransformer2DModel) else "attn"
                new[f"{src}{dst}.{part}.{wb}"] = sd[f"{src}attn1.{part}.{wb}"]
        for part in ("net.0.proj", "net.2"):
            for wb in ("weight", "bias"):
                new[f"{src}ff.{part}.{wb}"] = sd[f"{src}ff.{part}.{wb}"]
        if isinstance(model, PixArtTransformer2DModel):
            new[f"{src}scale_shift_table"] = (targets[i] - shared(feats)).mean(0).view(6, -1)
            new[f"{src}attn2.to_out.0.weight"] = torch.zeros_like(model.state_dict()[f"{src}attn2.to_out.0.weight"])
            new[f"{src}attn2.to_out.0.bias"] = torch.zeros_like(model.state_dict()[f"{src}attn2.to_out.0.bias"])
        else:
            new[f"{src}norm1.linear.weight"], new[f"{src}norm1.linear.bias"] = _fit(feats, targets[i])
            v = f"{src}attn.add_v_proj."
            for wb in ("weight", "bias"):
                new[v + wb] = torch.zeros_like(model.state_dict()[v + wb])
    if isinstance(model, PixArtTransformer2DModel):
        new.update({f"adaln_single.emb.timestep_embedder.{k}": v for k, v in temb.items()})
        new["adaln_single.linear.weight"], new["adaln_single.linear.bias"] = w_shared, b_shared
        # PixArt's output layer adds the raw timestep embedding to one table: match on average
        new["scale_shift_table"] = (dit_out - cond0.repeat(1, 2)).mean(0).view(2, -1)  # (shift, scale)
    else:
        new.update({f"time_text_embed.timestep_embedder.{k}": v for k, v in temb.items()})
        for wb in ("weight", "bias"):
            new[f"time_text_embed.text_embedder.linear_2.{wb}"] = torch.zeros_like(
                model.state_dict()[f"time_text_embed.text_embedder.linear_2.{wb}"])
        w, b = sd["proj_out_1.weight"], sd["proj_out_1.bias"]
        d = w.shape[0] // 2  # DiT: (shift, scale); AdaLayerNormContinuous: (scale, shift)
        new["norm_out.linear.weight"] = torch.cat([w[d:], w[:d]])
        new["norm_out.linear.bias"] = torch.cat([b[d:], b[:d]])
    missing, unexpected = model.load_state_dict(new, strict=False)
    if unexpected:
        raise ValueError(f"warm start produced unknown parameters: {unexpected[:4]}")
    params = dict(model.named_parameters())
    return sorted(k for k in missing if k in params)  # fixed buffers (sin-cos positions) are not "fresh"


@functools.lru_cache(maxsize=1)
def _encoded_captions() -> tuple[tuple[str, ...], TextEmbeddings]:
    captions, _ = caption_table()
    tokenizer, encoder = load_text_encoder()
    return tuple(captions), encode(tokenizer, encoder, captions)


class CaptionBank:
    """Every training caption encoded once; per step a caption is drawn for each image from its
    class and brightness tertile, or the empty caption with probability ``dropout``."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        captions, index = caption_table()
        cached, self.emb = _encoded_captions()
        assert list(cached) == captions
        self.captions = captions
        tones = brightness_tertiles(images)
        # pad each (class, tone) list to one length so drawing is one tensor op
        width = max(len(ids) for per in index for ids in per)
        table = torch.zeros(len(index), 3, width, dtype=torch.long)
        sizes = torch.zeros(len(index), 3, dtype=torch.long)
        for c, per in enumerate(index):
            for k, ids in enumerate(per):
                table[c, k, :len(ids)] = torch.tensor(ids)
                sizes[c, k] = len(ids)
        self.table, self.sizes = table, sizes
        self.labels, self.tones = labels, tones

    def draw(self, idx: torch.Tensor, dropout: float, gen: torch.Generator) -> torch.Tensor:
        c, k = self.labels[idx], self.tones[idx]
        pick = (torch.rand(len(idx), generator=gen) * self.sizes[c, k]).long()
        ids = self.table[c, k, pick]
        drop = torch.rand(len(idx), generator=gen) < dropout
        return torch.where(drop, 0, ids)  # caption 0 is the empty one


def call_kwargs(model, emb: TextEmbeddings) -> dict:
    from ..pipeline import text_call_kwargs

    return text_call_kwargs(model, emb)


def text_diffusion_loss(model, x0, emb: TextEmbeddings, cfg: TextTrainConfig, gen: torch.Generator,
                        noise_sched: DDPMScheduler | None = None) -> torch.Tensor:
    b = x0.shape[0]
    noise = torch.randn(x0.shape, generator=gen)
    if cfg.objective == "epsilon":
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (b,), generator=gen)
        xt = noise_sched.add_noise(x0, noise, t)
        pred = model(xt, timestep=t, **call_kwargs(model, emb)).sample
        per_sample = F.mse_loss(pred.float(), noise, reduction="none").mean(dim=(1, 2, 3))
        alphas = noise_sched.alphas_cumprod[t]
        snr = alphas / (1 - alphas)
        return ((snr.clamp(max=cfg.min_snr_gamma) / snr) * per_sample).mean()
    # rectified flow (SD3): x_t = (1 - s) x0 + s noise, target noise - x0, s ~ logit-normal(0, 1)
    s = torch.sigmoid(torch.randn(b, generator=gen))
    xt = (1 - s.view(-1, 1, 1, 1)) * x0 + s.view(-1, 1, 1, 1) * noise
    pred = model(xt, timestep=s * 1000, **call_kwargs(model, emb)).sample
    return F.mse_loss(pred.float(), noise - x0)


CHECKPOINT_KIND = "text-reference-checkpoint"
RESUME_KEYS = ("preset", "batch_size", "seed", "warm_start")


def default_scheduler(preset: str):
    if PRESETS[preset][2] == "flow":
        return FlowMatchEulerDiscreteScheduler(**FLOW_SCHEDULE)
    return DDIMScheduler(**NOISE_SCHEDULE)


def export_text_pipeline(transformer, preset: str, out: Path, training: dict | None = None) -> Path:
    """Write a ``TextPixelPipeline`` folder (transformer/, scheduler/, training.json) atomically."""
    from ..pipeline import TextPixelPipeline
    from .reference import save_pipeline_atomic

    pipe = TextPixelPipeline(transformer=transformer.eval(), scheduler=default_scheduler(preset))
    return save_pipeline_atomic(pipe, Path(out), training)


def command_of(cfg: TextTrainConfig) -> str:
    """The CLI command that reproduces ``cfg`` (options left at their defaults are omitted)."""
    d = TextTrainConfig(preset=cfg.preset)
    flags = {"steps": "--steps", "batch_size": "--batch-size", "lr": "--lr", "warm_start": "--warm-start",
             "seed": "--seed"}
    parts = [f"ditaccel train-text-reference --preset {cfg.preset}"]
    parts += [f"{flag} {getattr(cfg, k) if getattr(cfg, k) is not None else 'none'}"
              for k, flag in flags.items() if getattr(cfg, k) != getattr(d, k)]
    return " ".join(parts)


def train_text_reference(out_dir: str | Path, cfg: TextTrainConfig, export_to: str | Path | None = None,
                         progress: bool = True, stop_after: int | None = None) -> Path:
    """Train (or resume) a text-conditioned reference model; returns the exported pipeline
    folder (or the checkpoint stem when ``stop_after`` ends the run early)."""
    from ..registry import load_pipeline

    out_dir = Path(out_dir)
    ckpt = out_dir / "checkpoint"
    torch.manual_seed(cfg.seed)
    model = build_transformer(cfg.preset)
    fresh = []
    if cfg.warm_start:
        fresh = warm_start(model, load_pipeline(cfg.warm_start, "fp32").transformer)
    ema = build_transformer(cfg.preset)
    ema.load_state_dict(model.state_dict())
    ema.requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    step, log = 0, []
    if io.artifact_exists(ckpt):
        step, log = _load_checkpoint(ckpt, model, ema, opt, cfg, CHECKPOINT_KIND, RESUME_KEYS)
    x_all, y_all = load_fashion_mnist("train")
    bank = CaptionBank(x_all, y_all)
    noise_sched = DDPMScheduler(**NOISE_SCHEDULE)
    model.train()
    bar = tqdm(total=cfg.steps, initial=step, desc=f"train {cfg.preset}", disable=not progress)
    running, t0 = None, time.time() - (log[-1].get("elapsed_s", 0.0) if log else 0.0)
    end = cfg.steps if stop_after is None else min(cfg.steps, step + stop_after)
    while step < end:
        idx = _batch_indices(cfg, step, len(x_all))
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        for g in opt.param_groups:
            g["lr"] = _lr_at(cfg, step)
        emb = bank.emb.index(bank.draw(idx, cfg.caption_dropout, gen))
        loss = text_diffusion_loss(model, x_all[idx], emb, cfg, gen, noise_sched)
        train_update(model, ema, opt, loss, cfg, step)
        step += 1
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        bar.update(1)
        bar.set_postfix(loss=f"{running:.4f}", lr=f"{_lr_at(cfg, step - 1):.2e}")
        if step % cfg.ckpt_every == 0 or step == end:
            log.append({"step": step, "loss": round(running, 5), "elapsed_s": round(time.time() - t0, 1)})
            _save_checkpoint(ckpt, model, ema, opt, step, cfg, log, CHECKPOINT_KIND)
    bar.close()
    if step < cfg.steps:
        return ckpt
    training = {"train_config": asdict(cfg), "log": log, "fresh_parameters": fresh,
                "command": command_of(cfg)}
    return export_text_pipeline(ema, cfg.preset, Path(export_to) if export_to else out_dir / "pipeline", training)
