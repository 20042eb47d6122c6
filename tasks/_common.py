import re

from prefect.cache_policies import INPUTS, NONE, TASK_SOURCE

# Cached across flow runs: same inputs + same task code -> the stored result.
CACHED = INPUTS + TASK_SOURCE
UNCACHED = NONE


def prefect_key(text: str) -> str:
    """``text`` as a Prefect artifact or concurrency-limit key: lowercase letters, digits, dashes."""
    return re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")
