"""segany.training: the SAM training recipe (simulated interactive prompting, losses,
optimiser, schedule) and its LightningModule."""

from segany.training.embedding_cache import EmbeddingCache
from segany.training.losses import SamLoss, dice_loss, mask_iou, sigmoid_focal_loss
from segany.training.module import SamModule
from segany.training.optim import SamOptim, param_groups
from segany.training.prompting import PromptConfig, round_schedule
from segany.training.schedule import WarmupStepDecay
from segany.training.simulation import simulate

__all__ = [
    "SamModule",
    "EmbeddingCache",
    "SamLoss",
    "SamOptim",
    "PromptConfig",
    "WarmupStepDecay",
    "param_groups",
    "round_schedule",
    "simulate",
    "sigmoid_focal_loss",
    "dice_loss",
    "mask_iou",
]
