"""What the flows share: how a stage is run (cache-safe, one at a time or submitted), and
how its outcome is told to MLflow and to the terminal."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from mlflow.tracking import MlflowClient
from prefect import get_run_logger
from prefect.artifacts import create_link_artifact
from prefect.context import FlowRunContext, TaskRunContext, get_run_context
from prefect.logging.handlers import APILogHandler

from tailor.common.console import LOGGER, Stage, Stages
from tailor.config.settings import TailorConfig
from tailor.data.tokenised import TokensRef
from tailor.distill.activation_cache import ActivationsRef
from tailor.evaluate.harness import evaluation_signature
from tailor.registry import tracking
from tailor.store.checkpoint import CheckpointRef
from tailor.store.digested import is_intact
from tasks.measure import evaluate_model

T = TypeVar("T")
# Waits between tries of a stage's MLflow bookkeeping (what the Prefect task it once was retried).
LOG_RETRY_DELAYS_S = (2, 5, 10)


@dataclass
class RunContext:
    """One flow run: its settings, its MLflow parent run and its stage lines."""

    cfg: TailorConfig
    client: MlflowClient
    experiment_id: str
    parent_id: str
    stages: Stages
    signature: str
    """``evaluation_signature`` of the run's evaluation settings, computed once."""

    @contextmanager
    def stage(self, name: str) -> Iterator[Stage]:
        """``with run.stage("prune") as stage: ...; stage.detail = "..."``: the stage's start and
        end lines (see ``Stages.stage``; a failure is reported by ``close_failed_run``)."""
        with self.stages.stage(name) as stage:
            yield stage

    def log(self, stage: str, **kwargs) -> None:
        """The stage's child run under the parent (params, metrics, series, artifacts). A plain
        call, not a task: bookkeeping stays out of the run's task graph, retried all the same."""
        retried(
            lambda: tracking.log_stage_run(self.client, self.experiment_id, self.parent_id, stage, **kwargs),
            LOG_RETRY_DELAYS_S,
            f"MLflow child run of {stage}",
        )

    def close(self, seconds: float) -> None:
        """End the parent run FINISHED with the flow's wall time."""
        tracking.log_metrics(self.client, self.parent_id, {"flow_seconds": seconds})
        tracking.end_run(self.client, self.parent_id)
        _OPEN_RUNS.pop(self.flow_run_id, None)

    @property
    def flow_run_id(self) -> str:
        return str(get_run_context().flow_run.id)


def open_parent_run(cfg: TailorConfig, kind: str, stage_names: list[str], params: dict) -> RunContext:
    """The MLflow parent run of a ``kind`` flow (``sweep``, ``frontier``) with ``params``, its link
    in Prefect (artifact ``mlflow-<kind>-run``) and its stage lines."""
    flow_run_name = get_run_context().flow_run.name
    client, exp_id, parent = tracking.start_parent_run(
        cfg.tracking_uri,
        cfg.tracking.experiment,
        cfg.work_dir,
        f"{kind}-{cfg.profile}-{flow_run_name}",
        tags={"tailor.profile": cfg.profile, "tailor.kind": kind, "prefect.flow_run": flow_run_name},
    )
    run = track(RunContext(cfg, client, exp_id, parent, Stages(stage_names), evaluation_signature(cfg.eval, cfg.data)))
    tracking.log_params(client, parent, params)
    create_link_artifact(
        key=f"mlflow-{kind}-run",
        link=run_link(cfg.tracking_uri, exp_id, parent),
        description=f"MLflow parent run of this {kind}",
    )
    return run


def retried(call: Callable[[], T], delays_s: tuple[float, ...], what: str) -> T:
    """``call()``, tried again after each of ``delays_s`` seconds while it raises (a store or
    server that hiccups); the last failure is raised."""
    for delay in delays_s:
        try:
            return call()
        except Exception as exc:  # MLflow raises many types for a store that is briefly away
            LOGGER.warning(f"{what} failed ({type(exc).__name__}: {exc}); trying again in {delay} s")
            time.sleep(delay)
    return call()


class PrefectRunLog(APILogHandler):
    """The console's lines (the ``tailor`` logger) also in the Prefect run's logs, so the UI
    shows what the terminal does: sent to the API for the flow or task run they come from.
    Prefect's own run loggers would echo them on the terminal a second time."""

    def emit(self, record: logging.LogRecord) -> None:
        # Outside any run (the command line before the flow starts) a line has no run to go to.
        if getattr(record, "flow_run_id", None) or FlowRunContext.get() or TaskRunContext.get():
            super().emit(record)


def send_console_to_prefect() -> None:
    """Attach ``PrefectRunLog`` to the console's logger once per process (a subflow finds it there)."""
    if not any(isinstance(h, PrefectRunLog) for h in LOGGER.handlers):
        LOGGER.addHandler(PrefectRunLog())
    # A deployment's run has no command line to set the console up (setup_console): without
    # this its stage lines would stop at Python's default WARNING level.
    if LOGGER.getEffectiveLevel() > logging.INFO:
        LOGGER.setLevel(logging.INFO)


# The MLflow run each flow run opened, until it closes; the failure hooks find it here.
_OPEN_RUNS: dict[str, RunContext] = {}


def track(run: RunContext) -> RunContext:
    """Register the flow run's MLflow run for ``close_failed_run``; returns ``run``."""
    _OPEN_RUNS[run.flow_run_id] = run
    return run


def close_failed_run(flow, flow_run, state) -> None:
    """Prefect state hook (``on_failure``, ``on_crashed``, ``on_cancellation``): tag the stage
    that was under way on the flow's MLflow parent run, give that stage a FAILED child run and
    end the parent FAILED. Earlier stages' child runs and cached results stay."""
    run = _OPEN_RUNS.pop(str(flow_run.id), None)
    if run is None:  # failed before its MLflow run was opened (bad settings): nothing to close
        return
    stage = run.stages.current
    if stage:
        # flow_run_id for the Prefect UI's log: no run context is left to take it from.
        LOGGER.error(f"stage {stage} failed: {state.message}", extra={"flow_run_id": flow_run.id})
        run.client.set_tag(run.parent_id, "tailor.failed_stage", stage)
        # The library call, not the task: a hook runs after the flow run's context has closed.
        child = tracking.start_run(run.client, run.experiment_id, stage, run.parent_id, tags={"tailor.stage": stage})
        tracking.end_run(run.client, child, failed=True)
    tracking.end_run(run.client, run.parent_id, failed=True)


FAILURE_HOOKS = {
    "on_failure": [close_failed_run],
    "on_crashed": [close_failed_run],
    "on_cancellation": [close_failed_run],
}


def run_intact(task, *args):
    """Run a task whose record holds references (checkpoints, token files); a cached result
    whose files have since been deleted or edited is recomputed instead of handed on (where
    it would fail later, or feed stale data to stages keyed by its fingerprints)."""
    result = task(*args)
    broken = [ref.path for ref in _references(result) if not _intact(ref)] + _broken_files(result)
    if not broken:
        return result
    get_run_logger().warning(f"{task.name}: cached {', '.join(broken)} missing or changed; recomputing")
    return task.with_options(refresh_cache=True)(*args)


def _references(record) -> list:
    return [value for value in vars(record).values() if isinstance(value, (CheckpointRef, TokensRef, ActivationsRef))]


def _broken_files(record) -> list[str]:
    """A record that names its file by a plain ``path`` (the teacher's top-k cache): gone, or
    no longer the bytes recorded when it was written?"""
    path = getattr(record, "path", None)
    return [path] if isinstance(path, str) and not is_intact(Path(path)) else []


def _intact(ref: CheckpointRef | TokensRef | ActivationsRef) -> bool:
    try:
        ref.verify(contents=True)
    except (OSError, RuntimeError):
        return False
    return True


class Done:
    """The ``.result()`` interface of a future, for a task already run in the flow's thread."""

    def __init__(self, value):
        self._value = value

    def result(self):
        return self._value


def evaluate_stage(cfg: TailorConfig, signature: str, name: str, ref: CheckpointRef, stages: Stages | None = None):
    """The evaluation task for one model: submitted beside other stages with
    ``runner.concurrent``, else run now (one stage at a time, bounded memory). Returns a
    future-like ``.result()`` holder either way. ``signature``: ``evaluation_signature``."""
    stage_name = f"evaluate-{name}"
    task = evaluate_model.with_options(task_run_name=stage_name)
    args = (ref, cfg.eval, cfg.data, cfg.work_dir, name, signature)
    if stages is None:
        return launch(cfg, task, *args)
    if cfg.runner.concurrent:
        # Its end line comes when the flow collects the result.
        stages.start(stage_name)
        return launch(cfg, task, *args)
    with stages.stage(stage_name) as stage:
        run = launch(cfg, task, *args)
        stage.detail = accuracy_summary(run.result().metrics)
    return run


def launch(cfg: TailorConfig, task, *args):
    """Submit ``task`` to the flow's task runner (threads, or Dask workers) with
    ``runner.concurrent``, else run it now in the flow's thread; ``.result()`` either way."""
    return task.submit(*args) if cfg.runner.concurrent else Done(task(*args))


def accuracy_summary(metrics: dict) -> str:
    """``arc_easy acc 0.604 ± 0.022, ...`` (± one standard error)."""
    parts = []
    for task, per_metric in metrics.items():
        if "acc" in per_metric:
            acc = per_metric["acc"]
            parts.append(f"{task} acc {acc['value']:.3f}" + (f" ± {acc['stderr']:.3f}" if acc.get("stderr") else ""))
    return ", ".join(parts)


def metric_values(metrics: dict) -> dict[str, float]:
    """``{task: {metric: {"value", "stderr"}}}`` as flat MLflow metrics ``task.metric`` and ``task.metric_stderr``."""
    flat = {}
    for task, per_metric in metrics.items():
        for metric, score in per_metric.items():
            flat[f"{task}.{metric}"] = score["value"]
            if score.get("stderr") is not None:
                flat[f"{task}.{metric}_stderr"] = score["stderr"]
    return flat


def run_link(uri: str, exp_id: str, run_id: str) -> str:
    """The run's page in the MLflow UI (``mlflow ui`` on port 5000 for a local store). MLflow 3.x
    shows experiments in its GenAI view (traces) unless the URL asks for model training."""
    base = uri if uri.startswith("http") else "http://127.0.0.1:5000"
    return f"{base.rstrip('/')}/#/experiments/{exp_id}/runs/{run_id}?workflowType=machine_learning"
