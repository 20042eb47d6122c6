"""Model registration in MLflow as a task (I/O: retried, never cached). A stage's child run is
bookkeeping, not a step of the DAG: ``flows.stages.RunContext.log`` writes it with a plain call."""

from __future__ import annotations

from prefect import task

from tailor.registry import tracking
from tailor.registry.promotion import MODEL_DESCRIPTION
from tailor.store.checkpoint import CheckpointRef

from ._common import UNCACHED


@task(name="register-model", cache_policy=UNCACHED, retries=2, retry_delay_seconds=[5, 15])
def register_model(
    tracking_uri: str,
    experiment_id: str,
    parent_id: str,
    ref: CheckpointRef,
    model_name: str,
    alias: str,
    tags: dict[str, str],
    description: str = "",
) -> str:
    """Log the distilled checkpoint (transformers flavour) and register it under ``alias``
    with ``description``; the registered model gets the product's description if it has none."""
    client = tracking.client_for(tracking_uri)
    run_id = tracking.start_run(client, experiment_id, "register", parent_id, tags={"tailor.stage": "register"})
    try:
        version = tracking.register_checkpoint(
            tracking_uri,
            run_id,
            ref.verify().path,
            ref.fingerprint,
            model_name,
            alias,
            {**tags, "parent_run_id": parent_id},
            description,
            MODEL_DESCRIPTION,
        )
    except Exception:
        tracking.end_run(client, run_id, failed=True)
        raise
    client.set_tag(run_id, "registered_version", version)
    tracking.end_run(client, run_id)
    return version
