"""Running a trained Shiva artifact: ``apply_shiva(pipe, "runs/shiva/shiva")``.

The artifact (written by :func:`.train.save_shiva`) holds the router, the keep-ratio table over
every training timestep (the policy compiled to a lookup table), the adapters and the fingerprint
of the model it was trained on.  Applying it:

1. refuses another model (fingerprint of the base weights);
2. merges the adapters into the linears they tuned (peft; the original weights are kept so that
   :func:`remove_shiva` restores the model bit for bit);
3. looks the scheduler's timesteps up in the table: one token count per (step, layer), rounded to
   the artifact's multiple, so shapes are static and the same for every prompt; by default one
   logit shift first makes the mean keep ratio over those steps exactly the trained target (the
   EMA budget only holds it approximately, and a sampler visits the timesteps unevenly);
4. hands that plan and the router to the runtime (:func:`ditaccel.runtime.apply`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from ... import io
from ...plan import Plan
from .policy import plan_from_ratios
from .router import ShivaRouter, condition_of
from .train import KIND

_ORIGINALS = "_ditaccel_shiva_originals"
_NO_CONFIG = object()


@dataclass
class ShivaArtifact:
    router: ShivaRouter
    ratio_table: torch.Tensor          # (T_train, layers)
    adapters: dict[str, torch.Tensor]
    meta: dict

    @property
    def fingerprint(self) -> str:
        return self.meta["fingerprint"]


def load_shiva(stem, transformer) -> ShivaArtifact:
    """Read an artifact (safetensors + JSON only) for ``transformer``, refusing one trained for
    another model.

    Example::

        artifact = ditaccel.load_shiva("runs/shiva/shiva", pipe.transformer)
        ditaccel.apply_shiva(pipe, artifact, num_inference_steps=50)
    """
    tensors, meta = io.load_artifact(stem, KIND)
    fp = io.model_fingerprint(transformer)
    if fp != meta.get("fingerprint"):
        raise io.ArtifactError(f"{stem}: this Shiva artifact was trained for another model (fingerprint "
                               f"{meta.get('fingerprint')}, this model {fp}); train one for this model")
    table = tensors.get("ratio_table")
    if table is None or table.dim() != 2 or not torch.isfinite(table).all() or (table <= 0).any() or (table > 1).any():
        raise io.ArtifactError(f"{stem}: the keep-ratio table is missing or not in (0, 1]; the file is damaged, "
                               "retrain or regenerate it")
    r = meta["router"]
    cond, size = condition_of(transformer)
    hidden = int(transformer.config.num_attention_heads * transformer.config.attention_head_dim)
    router = ShivaRouter(hidden, int(meta["num_layers"]), cond, size, bottleneck=int(r["bottleneck"]),
                         share=int(r["share"]), t_dim=int(r["t_dim"]))
    try:
        router.load_state_dict({k[7:]: v for k, v in tensors.items() if k.startswith("router.")})
    except RuntimeError as e:
        raise io.ArtifactError(f"{stem}: router weights do not fit this model ({str(e).splitlines()[0]})") from None
    adapters = {k[8:]: v for k, v in tensors.items() if k.startswith("adapter.")}
    return ShivaArtifact(router.eval(), table, adapters, meta)


def budget_shift(ratios: torch.Tensor, keep: float, iters: int = 60) -> torch.Tensor:
    """Keep ratios (steps, layers) with one logit shift for all routed layers (column 0 stays 1)
    so that their mean is exactly ``keep``: the global budget enforced on the learned shape."""
    if not 0 < keep <= 1:
        raise ValueError(f"keep must be in (0, 1], got {keep}")
    r = ratios.double().clamp(1e-6, 1 - 1e-6)
    z = torch.log(r[:, 1:] / (1 - r[:, 1:]))
    lo, hi = -30.0, 30.0
    for _ in range(iters):  # the mean is increasing in the shift
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if float(torch.sigmoid(z + mid).mean()) < keep else (lo, mid)
    out = ratios.double().clone()
    out[:, 1:] = torch.sigmoid(z + (lo + hi) / 2)
    out[:, 0] = 1.0
    return out


def shiva_plan(artifact: ShivaArtifact, timesteps, num_tokens: int, modules=("attn", "mlp"),
               keep: float | None = None, exact_budget: bool = True) -> Plan:
    """The routing plan for a sampler's ``timesteps`` (in [0, T_train), in sampling order): a
    lookup in the artifact's table.  With ``exact_budget`` the looked-up ratios get one logit
    shift so that their mean over these steps and the routed layers is ``keep`` (default: the
    target the artifact was trained for) before the counts are rounded; the policy's own mean is
    kept in the plan's metadata as ``policy_mean_keep``."""
    t = torch.as_tensor(timesteps, dtype=torch.float64).reshape(-1)
    table = artifact.ratio_table
    idx = t.round().long().clamp(0, table.shape[0] - 1)
    ratios = table[idx].double()
    target = float(artifact.meta["keep"] if keep is None else keep)
    learned = float(ratios[:, 1:].mean())
    if exact_budget:
        ratios = budget_shift(ratios, target)
    return plan_from_ratios(ratios, num_tokens, modules, int(artifact.meta["multiple"]),
                            {"keep": target, "policy_mean_keep": learned, "exact_budget": exact_budget,
                             "fingerprint": artifact.fingerprint})


def _merge_adapters(transformer, artifact: ShivaArtifact) -> None:
    from peft import set_peft_model_state_dict
    from peft.tuners.tuners_utils import BaseTunerLayer

    from .train import inject_adapters

    meta = artifact.meta
    targets = list(meta["adapter_targets"])
    modules = dict(transformer.named_modules())
    missing = [n for n in targets if n not in modules]
    if missing:
        raise io.ArtifactError(f"the artifact's adapters target modules this model lacks ({missing[0]}, ...)")
    originals = {n: modules[n].weight.detach().clone() for n in targets}
    # peft leaves its config on the model; keep whatever was there (a user's own LoRA config, or
    # nothing) so that taking the artifact off restores it and the next artifact starts clean.
    prior_config = transformer.__dict__.get("peft_config", _NO_CONFIG)
    inject_adapters(transformer, meta["adapter"], int(meta["adapter_rank"]), targets)
    set_peft_model_state_dict(transformer, artifact.adapters)
    with torch.no_grad():
        for m in transformer.modules():
            if isinstance(m, BaseTunerLayer):
                m.merge()
    setattr(transformer, _ORIGINALS, (originals, prior_config))


def _unmerge_adapters(transformer) -> None:
    from peft.tuners.tuners_utils import BaseTunerLayer

    saved = getattr(transformer, _ORIGINALS, None)
    if saved is None:
        return
    originals, prior_config = saved
    named = dict(transformer.named_modules())
    for name in list(originals):
        layer = named[name]
        if isinstance(layer, BaseTunerLayer):
            base = layer.get_base_layer()
            with torch.no_grad():
                base.weight.copy_(originals[name])
            parent_name, _, child = name.rpartition(".")
            setattr(named[parent_name] if parent_name else transformer, child, base)
    delattr(transformer, _ORIGINALS)
    if prior_config is _NO_CONFIG:
        transformer.__dict__.pop("peft_config", None)
    else:
        transformer.peft_config = prior_config


def apply_shiva(pipe, artifact, num_inference_steps: int, num_tokens: int | None = None,
                scheduler=None, keep: float | None = None, exact_budget: bool = True,
                compile: bool | dict = False) -> Plan:
    """Run ``pipe`` (a diffusers pipeline) with a Shiva artifact (a stem or a loaded
    :class:`ShivaArtifact`) for ``num_inference_steps`` steps of ``scheduler`` (default: the
    pipeline's; pass the one you will sample with if you swap it); returns the plan.
    :func:`remove_shiva` undoes it.  ``compile``: run the blocks through ``torch.compile``
    (see :func:`ditaccel.runtime.apply`): one graph per distinct token count of the plan.

    Example::

        plan = ditaccel.apply_shiva(pipe, "runs/shiva/shiva", num_inference_steps=50)
        images = pipe(class_labels=[0, 7], num_inference_steps=50).images
    """
    from ...runtime import apply
    from ...runtime.adapters import image_tokens, modules_of

    tf = pipe.transformer
    if getattr(tf, _ORIGINALS, None) is not None:
        remove_shiva(pipe)
    if isinstance(artifact, ShivaArtifact):  # load_shiva checks a stem's fingerprint itself
        art = artifact
        if art.meta.get("fingerprint") != io.model_fingerprint(tf):
            raise io.ArtifactError("this Shiva artifact was trained for another model (fingerprint differs)")
    else:
        art = load_shiva(artifact, tf)
    sched = copy.deepcopy(scheduler if scheduler is not None else pipe.scheduler)
    sched.set_timesteps(num_inference_steps)
    plan = shiva_plan(art, sched.timesteps, num_tokens or image_tokens(tf), modules_of(tf), keep, exact_budget)
    art.router.to(device=tf.device, dtype=tf.dtype)
    if art.adapters:
        _merge_adapters(tf, art)
    try:
        apply(pipe, plan, router=art.router, check_fingerprint=False, compile=compile)
    except BaseException:
        _unmerge_adapters(tf)
        raise
    return plan


def remove_shiva(pipe) -> None:
    """Take a Shiva artifact off ``pipe``: hooks removed, adapter merges undone (exact).

    Example::

        ditaccel.remove_shiva(pipe)
    """
    from ...runtime import remove

    remove(pipe)
    _unmerge_adapters(pipe.transformer)
