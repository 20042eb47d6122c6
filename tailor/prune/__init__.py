"""Depth pruning: layer importance scores and removing whole decoder layers from a checkpoint."""
