"""Lightning callbacks that are not part of the paper's recipe."""

from segany.callbacks.benchmark import BenchmarkValidation
from segany.callbacks.time_budget import TimeBudget

__all__ = ["BenchmarkValidation", "TimeBudget"]
