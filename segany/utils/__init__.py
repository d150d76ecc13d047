"""Generic helpers below every other layer: atomic file writes, rank/world topology, Hydra resolvers, wandb."""
