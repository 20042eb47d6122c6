"""MLflow helpers: explicit run ids through ``MlflowClient`` (thread-safe, no fluent state).

One parent run per flow run, one child run per stage, the distilled model in the
Model Registry with an alias.
"""

from __future__ import annotations

import importlib.util
import json
import os
import threading
import time
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, Iterable

from mlflow.entities import Metric, Param, RunStatus
from mlflow.tracking import MlflowClient

from tailor.common.layout import WorkDir
from tailor.config.settings import TailorError

PARAM_MAX_LEN = 6000


class TrackingError(TailorError, RuntimeError):
    """The MLflow tracking server or registry cannot be used."""


def client_for(tracking_uri: str) -> MlflowClient:
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def check_reachable(tracking_uri: str) -> None:
    """Clear error before any stage runs when the tracking store cannot be reached."""
    if tracking_uri.startswith("sqlite:///"):
        Path(tracking_uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    # One quick attempt: MLflow's default HTTP retries would take minutes to say "down".
    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ.update({"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"})
    try:
        client_for(tracking_uri).search_experiments(max_results=1)
    except Exception as exc:  # MLflow raises many types for an unreachable store
        raise TrackingError(
            f"MLflow tracking store {tracking_uri!r} is not reachable "
            f"(tracking.tracking_uri / MLFLOW_TRACKING_URI): {exc}"
        ) from None
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def ensure_experiment(client: MlflowClient, name: str, artifact_root: Path | None) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = artifact_root.resolve().as_uri() if artifact_root else None
    # Model development, not a GenAI app. MLflow 3.x's UI goes by its own workflow switch (a URL
    # parameter, else the browser's choice, GenAI by default) rather than this tag: links say
    # which view to open (flows.stages.run_link).
    return client.create_experiment(
        name, artifact_location=location, tags={"mlflow.experimentKind": "custom_model_development"}
    )


def log_datasets(client: MlflowClient, run_id: str, datasets: Iterable[dict[str, str]]) -> None:
    """Log data as the run's dataset inputs: each {"name", "digest", "source", "context"}
    (context: "evaluation" or "distillation"), so the UI shows what the run read and its digest."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    client.log_inputs(
        run_id,
        datasets=[
            DatasetInput(
                Dataset(
                    name=d["name"],
                    digest=d["digest"][:16],
                    source_type="local",
                    source=json.dumps({"uri": d["source"]}),
                ),
                tags=[InputTag("mlflow.data.context", d["context"])],
            )
            for d in datasets
        ],
    )


def start_parent_run(
    tracking_uri: str, experiment: str, work_dir: str, run_name: str, tags: dict[str, str]
) -> tuple[MlflowClient, str, str]:
    """(client, experiment id, run id) of a flow's parent run; a local sqlite store keeps
    its artifacts under ``work_dir``/mlartifacts."""
    client = client_for(tracking_uri)
    artifact_root = WorkDir(work_dir).mlflow_artifacts if tracking_uri.startswith("sqlite:") else None
    exp_id = ensure_experiment(client, experiment, artifact_root)
    return client, exp_id, start_run(client, exp_id, run_name, tags=tags)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def start_run(
    client: MlflowClient,
    experiment_id: str,
    name: str,
    parent_id: str | None = None,
    tags: dict[str, str] | None = None,
) -> str:
    all_tags = dict(tags or {})
    if parent_id:
        all_tags["mlflow.parentRunId"] = parent_id
    return client.create_run(experiment_id, run_name=name, tags=all_tags).info.run_id


def log_params(client: MlflowClient, run_id: str, params: dict[str, Any]) -> None:
    items = [Param(k, _param_value(v)) for k, v in flatten(params).items()]
    _log_in_batches(client, run_id, "params", items, 100)


def _param_value(v: Any) -> str:
    text = json.dumps(v) if isinstance(v, (list, tuple, dict)) else str(v)
    return text[:PARAM_MAX_LEN]


def log_metrics(client: MlflowClient, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
    now = int(time.time() * 1000)
    items = [
        Metric(k, float(v), now, step)
        for k, v in flatten(metrics).items()
        if isinstance(v, (int, float)) and not isinstance(v, bool)
    ]
    _log_in_batches(client, run_id, "metrics", items, 500)


def log_series(client: MlflowClient, run_id: str, key: str, points: Iterable[tuple[int, float]]) -> None:
    """A metric's history: (step, value) pairs, shown by the MLflow UI as a curve over steps."""
    now = int(time.time() * 1000)
    items = [Metric(key, float(v), now, int(step)) for step, v in points]
    _log_in_batches(client, run_id, "metrics", items, 500)


def _log_in_batches(client: MlflowClient, run_id: str, kind: str, items: list, size: int) -> None:
    # MLflow caps the entries one log_batch call may carry (100 params, 1000 metrics).
    for i in range(0, len(items), size):
        client.log_batch(run_id, **{kind: items[i : i + size]})


def end_run(client: MlflowClient, run_id: str, failed: bool = False) -> None:
    client.set_terminated(run_id, RunStatus.to_string(RunStatus.FAILED if failed else RunStatus.FINISHED))


def log_stage_run(
    client: MlflowClient,
    experiment_id: str,
    parent_id: str,
    stage: str,
    params: dict,
    metrics: dict,
    series: dict[str, list[tuple[int, float]]] | None = None,
    artifacts: list[str] | None = None,
) -> str:
    """One child run under the parent holding a stage's params, metrics, curves and files; returns its id.
    A child that fails half-way is ended FAILED, so a retry leaves no run stuck RUNNING."""
    run_id = start_run(client, experiment_id, stage, parent_id, tags={"tailor.stage": stage})
    try:
        log_params(client, run_id, params)
        log_metrics(client, run_id, metrics)
        for key, points in (series or {}).items():
            log_series(client, run_id, key, points)
        for path in artifacts or []:
            client.log_artifact(run_id, path)
    except Exception:
        with suppress(Exception):  # the store may be what failed; the first error is the one to see
            end_run(client, run_id, failed=True)
        raise
    end_run(client, run_id)
    return run_id


def register_checkpoint(
    tracking_uri: str,
    run_id: str,
    checkpoint_path: str,
    fingerprint: str,
    model_name: str,
    alias: str,
    tags: dict[str, str],
    description: str = "",
    model_description: str = "",
) -> str:
    """Log the checkpoint with the transformers flavour, register it, set the alias.

    Idempotent: a version already holding this checkpoint fingerprint is reused, and its
    ``tailor.*`` tags and description are replaced by this evaluation's.
    Returns the version number.
    """
    import mlflow

    from tailor.store.checkpoint import CheckpointRef, load_model

    client = client_for(tracking_uri)
    existing = _version_with_fingerprint(client, model_name, fingerprint)
    if existing is None:
        model, tokenizer = load_model(CheckpointRef(checkpoint_path, fingerprint))
        with _fluent_store(tracking_uri), mlflow.start_run(run_id=run_id), _requirements_without_torchvision():
            info = mlflow.transformers.log_model(
                transformers_model={"model": model, "tokenizer": tokenizer},
                name="model",
                task="text-generation",
                registered_model_name=model_name,
                # Set as the version is created, not after: a run killed in between would leave
                # a version no re-run can find, and the re-run would register a second one.
                tags={"checkpoint_fingerprint": fingerprint},
                # (input, params): the signature then accepts generation settings at serving time.
                input_example=("The capital of France is", {"max_new_tokens": 32}),
            )
        existing = str(info.registered_model_version)
    else:
        # The version now stands for this evaluation only: an earlier evaluation's figures
        # (a task no longer reported, an old promotion decision) must not stay beside it.
        for key in client.get_model_version(model_name, existing).tags:
            if key.startswith("tailor.") and key not in tags:
                client.delete_model_version_tag(model_name, existing, key)
    for key, value in tags.items():
        client.set_model_version_tag(model_name, existing, key, value)
    if description:
        client.update_model_version(model_name, existing, description=description)
    # The registered model's description is the user's once set: only an empty one is filled.
    if model_description and not client.get_registered_model(model_name).description:
        client.update_registered_model(model_name, description=model_description)
    client.set_registered_model_alias(model_name, alias, existing)
    return existing


def registered_version(tracking_uri: str, model_uri: str) -> tuple[str, str, str | None]:
    """(name, version, checkpoint fingerprint tag) of ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``;
    a clear error when the registry holds no such version."""
    from mlflow.exceptions import MlflowException

    spec = model_uri.removeprefix("models:/")
    name, alias = spec.split("@", 1) if "@" in spec else (spec.rsplit("/", 1)[0], None)
    if not name or (alias is None and "/" not in spec):
        raise TailorError(
            f"{model_uri!r} is not a registered model URI; allowed: models:/NAME@ALIAS or models:/NAME/VERSION"
        )
    client = client_for(tracking_uri)
    try:
        version = (
            client.get_model_version_by_alias(name, alias)
            if alias is not None
            else client.get_model_version(name, spec.rsplit("/", 1)[1])
        )
    except MlflowException as exc:
        raise TailorError(f"{model_uri!r} is not in the registry at the configured tracking store: {exc}") from None
    return name, str(version.version), version.tags.get("checkpoint_fingerprint")


def load_registered(tracking_uri: str, name: str, version: str):
    """(model, tokenizer) of a registered transformers-flavour version."""
    import mlflow.transformers

    with _fluent_store(tracking_uri):
        components = mlflow.transformers.load_model(f"models:/{name}/{version}", return_type="components")
    return components["model"], components["tokenizer"]


_FLUENT_LOCK = threading.Lock()


@contextmanager
def _fluent_store(tracking_uri: str):
    """Point MLflow's process-global (fluent) API at ``tracking_uri`` for the duration only.

    ``mlflow.set_tracking_uri`` also exports MLFLOW_TRACKING_URI; left set, it would send
    every later run in this process (a long-lived worker) to this store.
    """
    import mlflow

    with _FLUENT_LOCK:
        saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_registry_uri(tracking_uri)
        try:
            yield
        finally:
            mlflow.set_tracking_uri(saved["MLFLOW_TRACKING_URI"])
            mlflow.set_registry_uri(saved["MLFLOW_REGISTRY_URI"])
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


@contextmanager
def _requirements_without_torchvision():
    """MLflow's transformers flavour pins torchvision for every torch model and fails when
    it is not installed; a text-generation model never imports it."""
    import mlflow.transformers as flavour

    if importlib.util.find_spec("torchvision") is not None:
        yield
        return
    from mlflow.utils.requirements_utils import _get_pinned_requirement

    original = flavour.get_default_pip_requirements
    flavour.get_default_pip_requirements = lambda model: [
        _get_pinned_requirement(p) for p in ("transformers", "torch", "accelerate") if importlib.util.find_spec(p)
    ]
    try:
        yield
    finally:
        flavour.get_default_pip_requirements = original


def _version_with_fingerprint(client: MlflowClient, model_name: str, fingerprint: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        versions = client.search_model_versions(f"name='{model_name}'")
    except MlflowException:
        return None
    for v in versions:
        if v.tags.get("checkpoint_fingerprint") == fingerprint:
            return str(v.version)
    return None
