"""Models: where a checkpoint comes from (embedded GGUF, tiny random, hub), precision, the output head."""
