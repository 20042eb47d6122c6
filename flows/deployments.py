"""Checks of prefect.yaml before `prefect deploy --all`: schedules, profiles, parameters, work pools.

Prefect reports a bad cron string only when deploying and an unknown work pool not
at all (runs just never start); this finds both, and settings that would fail at
run time, in seconds.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from prefect.client.schemas.schedules import CronSchedule

from tailor.config.settings import TailorError, load_config


class DeploymentError(TailorError, ValueError):
    """prefect.yaml describes a deployment that cannot run."""


def check_deployments(path: Path, check_pools: bool = True) -> list[str]:
    """Names of the deployments checked; raises DeploymentError listing every problem."""
    spec = yaml.safe_load(Path(path).read_text()) or {}
    problems, names, pools = [], [], set()
    for d in spec.get("deployments") or []:
        name = d.get("name", "?")
        names.append(name)
        for schedule in d.get("schedules") or []:
            if "cron" in schedule:
                try:
                    CronSchedule(cron=schedule["cron"], timezone=schedule.get("timezone"))
                except ValueError as exc:
                    problems.append(
                        f"deployment {name!r}: schedule cron {schedule['cron']!r} is invalid "
                        f"(minute hour day-of-month month day-of-week, e.g. '0 3 * * *'): "
                        f"{str(exc).splitlines()[-1].strip()}"
                    )
        params = d.get("parameters") or {}
        try:
            load_config(params.get("profile", "quick"), params.get("overrides") or [])
        except TailorError as exc:
            problems.append(f"deployment {name!r}: parameters: {exc}")
        pool = (d.get("work_pool") or {}).get("name")
        if not pool:
            problems.append(f"deployment {name!r}: no work_pool.name")
        else:
            pools.add(pool)
    if check_pools and pools:
        existing = _work_pools()
        for pool in sorted(pools - set(existing)):
            problems.append(
                f"work pool {pool!r} does not exist on the Prefect server; existing: "
                f"{', '.join(sorted(existing)) or 'none'} "
                f"(create it: prefect work-pool create {pool} --type process)"
            )
    if problems:
        raise DeploymentError(f"{path}:\n  " + "\n  ".join(problems))
    return names


def _work_pools() -> list[str]:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return [p.name for p in client.read_work_pools()]
