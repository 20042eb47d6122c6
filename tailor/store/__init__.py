"""Checkpoints on disk: content fingerprints, atomic writes, checkpoint references, the registry's promotion lock."""
