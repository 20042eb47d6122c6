"""Healing: the knowledge-distillation losses, the teacher's top-k cache, the trainer and its data-parallel launcher."""
