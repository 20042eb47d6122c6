"""Measurement: the lm-eval harness run (and its fast model), held-out perplexity, generation speed."""
