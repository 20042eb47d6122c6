"""Tasks that talk to MLflow: a child run per stage, model registration (I/O: retried, never cached)."""

from __future__ import annotations

from prefect import task

from tailor.registry import tracking
from tailor.registry.promotion import MODEL_DESCRIPTION
from tailor.store.checkpoint import CheckpointRef

from ._common import UNCACHED


@task(name="log-stage", cache_policy=UNCACHED, retries=3, retry_delay_seconds=[2, 5, 10])
def log_stage(tracking_uri: str, experiment_id: str, parent_id: str, stage: str, params: dict,
              metrics: dict, series: dict[str, list[tuple[int, float]]] | None = None,
              artifacts: list[str] | None = None, failed: bool = False) -> str:
    """One child run under the flow's parent run holding a stage's params, metrics and files."""
    client = tracking.client_for(tracking_uri)
    run_id = tracking.start_run(client, experiment_id, stage, parent_id, tags={"tailor.stage": stage})
    tracking.log_params(client, run_id, params)
    tracking.log_metrics(client, run_id, metrics)
    for key, points in (series or {}).items():
        tracking.log_series(client, run_id, key, points)
    for path in artifacts or []:
        client.log_artifact(run_id, path)
    tracking.end_run(client, run_id, failed=failed)
    return run_id


@task(name="register-model", cache_policy=UNCACHED, retries=2, retry_delay_seconds=[5, 15])
def register_model(tracking_uri: str, experiment_id: str, parent_id: str, ref: CheckpointRef,
                   model_name: str, alias: str, tags: dict[str, str], description: str = "") -> str:
    """Log the distilled checkpoint (transformers flavour) and register it under ``alias``
    with ``description``; the registered model gets the product's description if it has none."""
    client = tracking.client_for(tracking_uri)
    run_id = tracking.start_run(client, experiment_id, "register", parent_id, tags={"tailor.stage": "register"})
    try:
        version = tracking.register_checkpoint(tracking_uri, run_id, ref.verify().path, ref.fingerprint,
                                               model_name, alias, {**tags, "parent_run_id": parent_id},
                                               description, MODEL_DESCRIPTION)
    except Exception:
        tracking.end_run(client, run_id, failed=True)
        raise
    client.set_tag(run_id, "registered_version", version)
    tracking.end_run(client, run_id)
    return version
