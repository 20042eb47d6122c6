"""Healing: the knowledge-distillation losses, the teacher's top-k cache, the trainer and its records,
the data-parallel launcher and the process each rank runs."""
