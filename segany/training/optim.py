"""AdamW with layer-wise lr decay over the image encoder's blocks and no weight decay on
norms, biases, position embeddings and rel-pos tables.

Layer ids: patch embedding and pos_embed 0, encoder block i -> i + 1, everything after the
blocks (neck, prompt encoder, mask decoder) -> depth + 1; lr scale = decay^(depth + 1 - id).
Only parameters that require gradients are grouped: with LoRA (segany.modeling.lora) that is
the adapters, each in its block's layer (lora=qkv sets layer_decay 1: one lr for all), with
weight decay (2-d), plus the unfrozen prompt encoder / mask decoder.

AdamW with layer-wise lr decay is the SAM paper's recipe (Kirillov et al. 2023, appendix A);
the groups follow MAE's ``util/lr_decay.py`` (no weight decay on 1-d parameters). Why the lr
is written into each group: timm's ``param_groups_layer_decay`` (``timm/optim/_param_groups.py``) only sets
``lr_scale``, which only timm's own schedulers apply (``timm/scheduler/scheduler.py``); torch
and Lightning schedulers ignore it. Here every group gets ``lr = base_lr * scale`` written in
(``lr_scale`` is kept for reference) and the scheduler is a LambdaLR, which multiplies each
group's own initial lr.
"""

from __future__ import annotations

from typing import Iterable, Optional, Sequence

import torch
from timm.models import group_parameters
from timm.optim import param_groups_layer_decay
from torch import nn

from segany.training.schedule import WarmupStepDecay

NO_DECAY_KEYS = ("pos_embed", "rel_pos")


def param_groups(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    layer_decay: float = 1.0,
    no_decay_keys: Sequence[str] = NO_DECAY_KEYS,
) -> list:
    """Trainable parameters of ``model`` (a Sam) grouped by (lr scale, decay?) with timm's
    ``param_groups_layer_decay`` over ``Sam.group_matcher``; no decay on 1-d parameters (norms,
    biases) and names containing one of ``no_decay_keys``. Each group: {"params", "names",
    "lr": lr * lr_scale, "lr_scale", "weight_decay", "name"}."""
    groups = param_groups_layer_decay(
        model,
        weight_decay=weight_decay,
        no_weight_decay_list=[f"*{k}*" for k in no_decay_keys],  # fnmatch: substring of the name
        layer_decay=layer_decay,
    )
    name_of = {id(p): n for n, p in model.named_parameters()}
    layer_of = group_parameters(model, model.group_matcher(), reverse=True)  # the layer ids timm used
    for g in groups:
        g["names"] = [name_of[id(p)] for p in g["params"]]
        g["lr"] = lr * g["lr_scale"]
        g["name"] = f"layer_{layer_of[g['names'][0]]}_{'decay' if g['weight_decay'] else 'no_decay'}"
    return groups


class SamOptim:
    """Config node ``optim``: builds the optimizer and its per-step scheduler for a Sam.
    ``milestones`` and ``cooldown`` are fractions of the run's ``max_steps`` (see
    schedule.py); ``warmup_iters`` is in steps. ``optim(model, max_steps)`` -> (AdamW, LambdaLR)."""

    def __init__(
        self,
        lr: float = 8e-4,
        betas: Sequence[float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.1,
        layer_decay: float = 1.0,
        no_decay_keys: Iterable[str] = NO_DECAY_KEYS,
        warmup_iters: int = 250,
        warmup_start_factor: Optional[float] = None,
        milestones: Sequence[float] = (),
        gamma=0.1,
        cooldown: Sequence[float] = (),
        cooldown_final: float = 0.0,
        fused: bool = False,
    ):
        if lr <= 0:
            raise ValueError(f"optim.lr={lr} must be > 0")
        if not 0 < layer_decay <= 1:
            raise ValueError(f"optim.layer_decay={layer_decay} must be in (0, 1]")
        self.lr, self.betas, self.eps = float(lr), tuple(betas), float(eps)
        self.weight_decay, self.layer_decay = float(weight_decay), float(layer_decay)
        self.no_decay_keys = tuple(no_decay_keys)
        self.fused = bool(fused)
        # validated here (bad values fail at instantiation); the run length comes in __call__
        self.schedule = WarmupStepDecay(warmup_iters, milestones, gamma, warmup_start_factor, cooldown, cooldown_final)

    def __call__(self, model: nn.Module, max_steps: Optional[int] = None):
        """max_steps: the run length the schedule's fractions refer to (trainer.max_steps)."""
        self.schedule.set_max_steps(max_steps)
        groups = param_groups(model, self.lr, self.weight_decay, self.layer_decay, self.no_decay_keys)
        if not groups:
            raise ValueError("optim: no trainable parameters (are all parts frozen?)")
        for g in groups:
            g.pop("names")
        opt = torch.optim.AdamW(
            groups,
            lr=self.lr,
            betas=self.betas,
            eps=self.eps,
            weight_decay=self.weight_decay,
            **({"fused": True} if self.fused else {}),
        )
        sched = torch.optim.lr_scheduler.LambdaLR(opt, self.schedule)
        return opt, sched
