from prefect.cache_policies import INPUTS, NONE, TASK_SOURCE

# Cached across flow runs: same inputs + same task code -> the stored result.
CACHED = INPUTS + TASK_SOURCE
UNCACHED = NONE
