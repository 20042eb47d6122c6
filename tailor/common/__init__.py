"""Utilities every layer may use: the console (progress, quiet third-party output), stage costs (time, memory), paired statistics."""
