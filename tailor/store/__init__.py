"""Checkpoints on disk: content fingerprints, atomic writes, checkpoint references, file locks."""
