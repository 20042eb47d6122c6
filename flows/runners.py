"""The task runner a run's settings ask for: threads of the flow's process, or Dask workers.

Prefect fixes a flow's task runner before its body runs, so the caller (``tailor run``,
``tailor sweep``, or your own code) picks it from the settings:

    flow.with_options(task_runner=task_runner_for(cfg.runner))(profile=..., overrides=...)
"""

from __future__ import annotations

from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from tailor.config.settings import RunnerConfig


def frontier_runner(runner: RunnerConfig) -> TaskRunner:
    """The frontier's candidates at once: the Dask cluster the settings name, else a local one of
    two worker processes."""
    return task_runner_for(runner if runner.on_dask else RunnerConfig(concurrent=True, dask_workers=2))


def task_runner_for(runner: RunnerConfig) -> TaskRunner:
    """Threads (the flows' default), a local Dask cluster of ``runner.dask_workers`` processes,
    or the Dask cluster at ``runner.dask_address``."""
    if not runner.on_dask:
        return ThreadPoolTaskRunner(max_workers=4)
    from prefect_dask import DaskTaskRunner

    if runner.dask_address:
        return DaskTaskRunner(address=runner.dask_address)
    # One thread per worker: torch uses the cores itself. No Dask memory limit: its manager
    # would pause or kill a worker whose model briefly outgrows an equal share of memory.
    return DaskTaskRunner(
        cluster_kwargs={
            "n_workers": runner.dask_workers,
            "threads_per_worker": 1,
            "processes": True,
            "memory_limit": 0,
            "dashboard_address": None,
        }
    )
