"""The promotion gate as a Prefect task, serialised per registered model: by a file lock between
processes of this machine and by a global concurrency limit between runs sharing a Prefect server."""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import asdict

from prefect import task
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

from tailor.config.settings import PromotionConfig
from tailor.registry import tracking
from tailor.registry.promotion import promote
from tailor.store.locks import file_lock, promotion_lock_path

from ._common import UNCACHED, prefect_key


@task(name="promote-model", cache_policy=UNCACHED, retries=2, retry_delay_seconds=[5, 15])
def promote_model(
    tracking_uri: str, model_name: str, version: str, gate: PromotionConfig, work_dir: str, force: bool = False
) -> dict:
    """Judge ``version`` against the champion and move the alias when it passes; returns the decision."""
    limit = _promotion_limit(model_name)
    with ExitStack() as lock:
        lock.enter_context(file_lock(promotion_lock_path(tracking_uri, model_name, work_dir)))
        # strict: without the limit there would be no mutual exclusion, so fail instead.
        lock.enter_context(concurrency(limit, occupy=1, strict=True, timeout_seconds=600))
        decision = promote(tracking.client_for(tracking_uri), model_name, version, gate, force)
    return asdict(decision)


def _promotion_limit(model_name: str) -> str:
    """A global concurrency limit of one slot for this registered model (created on first use)."""
    name = f"tailor-promotion-{prefect_key(model_name)}"
    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            try:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
            except ObjectAlreadyExists:
                pass  # another run created it first
    return name
