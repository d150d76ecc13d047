"""Lightning callbacks that are not part of the paper's recipe."""

from segany.callbacks.forgetting import ForgettingCheck
from segany.callbacks.time_budget import TimeBudget
from segany.callbacks.zero_shot import ZeroShotValidation

__all__ = ["ZeroShotValidation", "ForgettingCheck", "TimeBudget"]
