"""segany.training: the SAM training recipe (simulated interactive prompting, losses,
optimiser, schedule) and its LightningModule."""
from .budget import TimeBudget
from .losses import SamLoss, dice_loss, mask_iou, sigmoid_focal_loss
from .module import SamModule
from .optim import SamOptim, param_groups
from .prompting import PromptConfig, round_schedule
from .schedule import WarmupStepDecay
from .simulation import simulate

__all__ = ["SamModule", "SamLoss", "SamOptim", "PromptConfig", "WarmupStepDecay", "param_groups",
           "round_schedule", "simulate", "TimeBudget", "sigmoid_focal_loss", "dice_loss", "mask_iou"]
