"""Helpers for tests and benchmarks: toy batches, files written in the real formats."""
