"""Comparison: the report of original, pruned and distilled models, healing statistics, plots, sweep tables."""
