"""The promotion gate as a Prefect task. Promotions of one registered model are serialised by a lock
kept in the MLflow registry itself (``tailor.store.locks``), so runs that share only the tracking
store take turns whatever its URI: sqlite file or ``mlflow server``, one Prefect server or several.
A retry (the task retries twice) finds the decision its failed attempt recorded and reports that one."""

from __future__ import annotations

from dataclasses import asdict

from prefect import task

from tailor.config.settings import PromotionConfig
from tailor.registry import tracking
from tailor.registry.promotion import promote

from ._common import UNCACHED

# A promotion takes a few registry calls; the lease bounds how long a killed holder blocks the next one.
LOCK_LEASE_S = 120.0
LOCK_WAIT_S = 600.0


@task(name="promote-model", cache_policy=UNCACHED, retries=2, retry_delay_seconds=[5, 15])
def promote_model(
    tracking_uri: str,
    model_name: str,
    version: str,
    gate: PromotionConfig,
    *,
    force: bool = False,
) -> dict:
    """Judge ``version`` against the champion and move the alias when it passes; returns the decision."""
    client = tracking.client_for(tracking_uri)
    decision = promote(client, model_name, version, gate, force=force, lease_s=LOCK_LEASE_S, lock_timeout_s=LOCK_WAIT_S)
    return asdict(decision)
