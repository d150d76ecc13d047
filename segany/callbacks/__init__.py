"""Lightning callbacks that are not part of the paper's recipe."""

from segany.callbacks.benchmark import BenchmarkValidation
from segany.callbacks.forgetting import ForgettingCheck
from segany.callbacks.time_budget import TimeBudget

__all__ = ["BenchmarkValidation", "ForgettingCheck", "TimeBudget"]
