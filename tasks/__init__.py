"""Thin Prefect tasks over the ``tailor`` library.

Each task takes small hashable inputs (config sections, ``CheckpointRef``) and
returns a small record. Heavy tasks are cached across flow runs on their inputs
and source (``INPUTS + TASK_SOURCE``); their outputs live in the work folder and
are verified before reuse.
"""
