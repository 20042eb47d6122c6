"""Utilities every layer may use: the work folder's layout, the console (progress, quiet third-party
output), stage costs (time, memory), paired statistics."""
