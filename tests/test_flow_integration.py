"""The whole flow on the tiny model through a real Prefect and a real MLflow sqlite store."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.integration

HEAVY = (
    "materialize-model",
    "prune-model",
    "distill-model",
    "evaluate-models",
    "score-heldout-original",
    "score-heldout-pruned",
    "score-heldout-distilled",
    "measure-speed",
)


def _run(work, shared_data, *overrides, expect_failure=False):
    from flows.tailor_flow import tailor_flow

    state = tailor_flow(
        profile="smoke",
        overrides=[f"work_dir={work}", f"data.data_dir={shared_data}", *overrides],
        out_dir=str(work / "out"),
        return_state=True,
    )
    assert state.is_failed() == expect_failure, state.message
    return state


def _task_runs(state, stages: tuple[str, ...] = HEAVY) -> dict[str, list[str]]:
    """The state names of every run of each of ``stages`` in a flow run, keyed by stage name
    (a cached stage whose files were lost runs twice: served from cache, then recomputed)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
        )
    names: dict[str, list[str]] = {}
    for run in runs:
        stage = next((h for h in stages if run.name.startswith(h)), None)
        if stage:
            names.setdefault(stage, []).append(run.state.name)
    return names


def _task_states(state) -> dict[str, str]:
    """The final state name of each heavy stage in a flow run, keyed by stage name."""
    return {stage: "Completed" if "Completed" in s else s[-1] for stage, s in _task_runs(state).items()}


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, shared_data):
    work = tmp_path_factory.mktemp("flow")
    state = _run(work, shared_data)
    return work, state, state.result()


def test_first_run_reports_three_models_and_registers_challenger(first_run):
    work, state, result = first_run
    assert all(v == "Completed" for v in _task_states(state).values())
    report = json.loads((work / "out" / "report.json").read_text())
    assert set(report["models"]) == {"original", "pruned", "distilled"}
    assert report["models"]["original"]["layers"] == 4 and report["models"]["pruned"]["layers"] == 3
    for model in report["models"].values():
        assert set(model["metrics"]) == {"arc_easy", "winogrande", "hellaswag", "lambada_openai"}
        assert model["tokens_per_s"] > 0 and isinstance(model["sample_continuation"], str)
    assert report["distillation"]["optimizer_steps"] == 2
    markdown = (work / "out" / "report.md").read_text()
    assert "| parameters |" in markdown
    # The report says how distillation ran and how long it took.
    assert f"- KD mode: teacher {report['distillation']['teacher']}; student float32" in markdown
    assert f"in {report['distillation']['train_seconds']:.1f} s" in markdown

    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    version = client.get_model_version_by_alias("tailor-smoke", "challenger")
    assert str(version.version) == result["version"]
    assert version.tags["checkpoint_fingerprint"] == report["checkpoints"]["distilled"]["fingerprint"]
    parent = client.get_run(result["parent_run_id"])
    assert parent.info.status == "FINISHED"
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    stages = {r.data.tags["tailor.stage"] for r in children}
    assert {
        "materialize",
        "prune",
        "distill",
        "evaluate-original",
        "evaluate-pruned",
        "evaluate-distilled",
        "measure-speed",
        "compare",
        "register",
    } <= stages
    distill_run = next(r for r in children if r.data.tags["tailor.stage"] == "distill")
    losses = client.get_metric_history(distill_run.info.run_id, "kd_loss")
    assert [m.step for m in losses] == [1, 2]
    curve = client.get_metric_history(distill_run.info.run_id, "heldout_perplexity")
    assert [(m.step, m.value) for m in curve] == [tuple(p) for p in report["distillation"]["heldout_curve"]]
    assert [m.step for m in curve] == [0, 2]
    assert distill_run.data.params["temperature"] == "2.0"


def test_prefect_shows_the_console_lines_and_no_bookkeeping_tasks(first_run):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    _, state, _ = first_run
    run_id = state.state_details.flow_run_id
    APILogHandler().flush()  # the log worker sends in batches
    with get_client(sync_client=True) as client:
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))
    lines = [log.message for log in logs if log.name == "tailor"]
    assert any(line.endswith("] materialize ...") for line in lines), lines
    assert any("] compare done in" in line for line in lines), lines
    # A stage's MLflow child run is bookkeeping, not a step of the task graph.
    assert not [t.name for t in tasks if t.name.startswith("log-stage")]


def test_tailor_eval_scores_the_registered_challenger_like_the_flow_scored_it(first_run, shared_data, tmp_path):
    from tailor.config.settings import load_config
    from tailor.eval_command import evaluate_to_folder, resolve_model

    work, _, result = first_run
    cfg = load_config("smoke", [f"work_dir={work}", f"data.data_dir={shared_data}"])
    ref, name = resolve_model(f"models:/{result['registered_model']}@challenger", cfg)
    assert name == f"{result['registered_model']}-v{result['version']}"
    record = evaluate_to_folder(ref, name, cfg, tmp_path)
    report = json.loads((work / "out" / "report.json").read_text())
    # The registry's copy of the distilled model scores what the flow's evaluation scored.
    for task, metrics in report["models"]["distilled"]["metrics"].items():
        assert record["metrics"][task]["acc"]["value"] == pytest.approx(metrics["acc"]["value"]), task
    assert list(tmp_path.rglob("results_*.json"))
    with pytest.raises(Exception, match="not in the registry"):
        resolve_model(f"models:/{result['registered_model']}@no-such-alias", cfg)


def test_mlflow_shows_lineage_datasets_and_descriptions(first_run):
    work, _, result = first_run
    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("llm-tailor")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    inputs = client.get_run(result["parent_run_id"]).inputs.dataset_inputs
    contexts = {i.dataset.name: {t.key: t.value for t in i.tags}["mlflow.data.context"] for i in inputs}
    assert contexts == {
        "arc_easy": "evaluation",
        "winogrande": "evaluation",
        "hellaswag": "evaluation",
        "lambada_openai": "evaluation",
        "tinystories_sample": "distillation",
    }
    assert all(len(i.dataset.digest) == 16 for i in inputs)
    model = client.get_registered_model(result["registered_model"])
    assert "distillation" in model.description
    version = client.get_model_version(result["registered_model"], result["version"])
    assert version.description.startswith("Depth-pruned from tiny model: decoder layers [")
    assert "Report: " in version.description and version.run_id
    assert client.get_run(version.run_id).data.tags["tailor.stage"] == "register"


def test_report_shows_healing_and_heldout_perplexity_of_all_three(first_run):
    work, _, _ = first_run
    report = json.loads((work / "out" / "report.json").read_text())
    healing = report["healing"]
    keys = {"delta_vs_pruned", "delta_ci95", "recovered_share", "recovered_share_ci95"}
    assert keys <= set(healing["pooled"])
    assert set(healing["per_task"]) == {"arc_easy", "winogrande", "hellaswag", "lambada_openai"}
    assert all(keys <= set(r) for r in healing["per_task"].values())
    assert {"pruned", "distilled", "original", "recovered_share"} <= set(healing["perplexity"])
    assert healing["pooled"]["n"] == 4 * report["eval_limit"]
    held = report["heldout_perplexity"]
    assert set(held) == {"original", "pruned", "distilled"} and all(h["perplexity"] > 1 for h in held.values())
    # The healing curve starts at the pruned model and ends at the distilled one, as scored on their own.
    curve = report["distillation"]["heldout_curve"]
    assert curve[0][1] == pytest.approx(held["pruned"]["perplexity"], rel=1e-4)
    assert curve[-1][1] == pytest.approx(held["distilled"]["perplexity"], rel=1e-4)
    markdown = (work / "out" / "report.md").read_text()
    assert "## Healing: what distillation recovered" in markdown and "Held-out corpus perplexity" in markdown
    assert (work / "out" / "healing_curve.png").stat().st_size > 0


def test_second_identical_run_is_served_from_cache(first_run, shared_data):
    work, _, result = first_run
    state = _run(work, shared_data)
    assert _task_states(state) == {stage: "Cached" for stage in HEAVY}
    # The same weights are not registered twice.
    assert state.result()["version"] == result["version"]


def test_a_cached_stage_whose_checkpoint_was_deleted_is_recomputed(first_run, shared_data):
    import shutil

    work, _, result = first_run
    pruned = json.loads((work / "out" / "report.json").read_text())["checkpoints"]["pruned"]["path"]
    shutil.rmtree(pruned)
    states = _task_states(_run(work, shared_data))
    assert (work / "out" / "report.json").exists() and (Path(pruned) / "FINGERPRINT").exists()
    # The rebuilt checkpoint has the same fingerprint, so what follows stays cached.
    assert states["materialize-model"] == states["distill-model"] == "Cached"


def test_deleted_evaluations_are_computed_again_not_served(first_run, shared_data):
    import shutil

    work, _, _ = first_run
    before = json.loads((work / "out" / "report.json").read_text())
    shutil.rmtree(work / "evals")  # per-document scores and every stored answer
    _run(work, shared_data)
    after = json.loads((work / "out" / "report.json").read_text())
    assert after["models"] == before["models"]
    assert all(n > 0 for n in after["evaluation"]["scored_requests"].values())


def test_a_deleted_or_edited_teacher_cache_is_computed_again(first_run, shared_data):
    import torch

    work, _, _ = first_run
    topk = "distill.teacher_topk=4"

    def teacher_cache_runs() -> list[str]:
        runs = _task_runs(_run(work, shared_data, topk), stages=("cache-teacher-topk",))
        return sorted(runs["cache-teacher-topk"])

    def contents(path: Path) -> dict:  # torch.save's bytes name the file they were first written as
        return torch.load(path, weights_only=True)

    assert teacher_cache_runs() == ["Completed"]
    (cache,) = (work / "teacher-cache").glob("teacher-top4-*.pt")
    written = contents(cache)
    assert teacher_cache_runs() == ["Cached"]

    cache.unlink()
    assert teacher_cache_runs() == ["Cached", "Completed"]  # its record served, its file found gone
    assert contents(cache).keys() == written.keys()
    assert all(torch.equal(contents(cache)[k], v) for k, v in written.items() if isinstance(v, torch.Tensor))

    cache.write_bytes(cache.read_bytes()[: cache.stat().st_size // 2])  # truncated, as by a full disk
    assert teacher_cache_runs() == ["Cached", "Completed"]
    assert all(torch.equal(contents(cache)[k], v) for k, v in written.items() if isinstance(v, torch.Tensor))


def test_a_linear_map_alone_heals_with_no_training_step(tmp_path, shared_data):
    _run(tmp_path, shared_data, "distill.linear_map=true", "distill.epochs=0")
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    kd = report["distillation"]
    assert kd["optimizer_steps"] == 0 and kd["losses"] == []
    assert kd["linear_map"]["replaced"] == [3] and kd["linear_map"]["layer"] == 2
    assert 0 < kd["linear_map"]["explained"] <= 1
    # Nothing added: the healed model has the pruned model's shape.
    assert report["models"]["distilled"]["params"] == report["models"]["pruned"]["params"]
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert "- linear map in place of layers [3], folded into layer 2 (no parameters added)" in markdown
    assert "- distillation: no optimiser step (distill.epochs=0)" in markdown


def test_a_map_then_hidden_state_training_then_a_short_logit_kd(tmp_path, shared_data):
    recipe = ["distill.linear_map=true", "distill.objective=hidden", "distill.hidden_loss=cosine"]
    state = _run(tmp_path, shared_data, *recipe, "distill.then=[{objective: logits, num_samples: 8}]")
    runs = _task_runs(state, ("distill-model-then-1", "distill-model"))
    assert runs == {"distill-model": ["Completed"], "distill-model-then-1": ["Completed"]}
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    first, (second,) = report["distillation"], report["distillation_then"]
    assert first["linear_map"]["replaced"] == [3] and first["loss"]["objective"] == "hidden"
    assert first["num_samples"] == 16 and first["optimizer_steps"] == 2
    # The second phase trains the first phase's student on the first 8 of the same samples.
    assert second["settings"] == {"objective": "logits", "num_samples": 8}
    assert second["loss"]["objective"] == "logits" and second["linear_map"] is None
    assert (second["num_samples"], second["optimizer_steps"]) == (8, 1)
    # What is evaluated and registered is the last phase's model.
    from tailor.distill.record import TRAINING_RECORD

    distilled = Path(report["checkpoints"]["distilled"]["path"])
    assert json.loads((distilled / TRAINING_RECORD).read_text())["num_samples"] == 8
    assert report["stages"]["distill-then-1"]["seconds"] > 0
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert "- then (phase 2, objective=logits, num_samples=8): logit KD" in markdown
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    version = client.get_model_version("tailor-smoke", state.result()["version"])
    assert "Then phase 2: objective=logits, num_samples=8: 1 optimiser steps on 8 samples." in version.description

    # Changing the later phase re-runs it alone: the first phase's keys never see it.
    state = _run(tmp_path, shared_data, *recipe, "distill.then=[{objective: logits, num_samples: 4}]")
    runs = _task_runs(state, ("distill-model-then-1", "distill-model"))
    assert runs == {"distill-model": ["Cached"], "distill-model-then-1": ["Completed"]}


def test_changing_a_distillation_setting_reruns_only_what_follows(first_run, shared_data):
    work, _, _ = first_run
    states = _task_states(_run(work, shared_data, "distill.learning_rate=0.002"))
    unchanged = ("materialize-model", "prune-model", "score-heldout-original", "score-heldout-pruned")
    assert {s: states[s] for s in unchanged} == dict.fromkeys(unchanged, "Cached")
    assert {s: states[s] for s in ("distill-model", "evaluate-models", "measure-speed")} == dict.fromkeys(
        ("distill-model", "evaluate-models", "measure-speed"), "Completed"
    )
    # The original's and the pruned model's answers were kept per model: only the new one is scored.
    scored = json.loads((work / "out" / "report.json").read_text())["evaluation"]["scored_requests"]
    assert scored["original"] == scored["pruned"] == 0 < scored["distilled"]


def test_failed_stage_marks_runs_failed_and_keeps_earlier_stages(first_run, shared_data):
    work, _, _ = first_run
    # A vanishing temperature turns the softened logits into inf/inf: a non-finite loss.
    state = _run(work, shared_data, "distill.temperature=1e-40", expect_failure=True)
    assert "stage 'distill' failed" in state.message or "non-finite" in str(state.message)
    states = _task_states(state)
    assert states["materialize-model"] == states["prune-model"] == "Cached"
    assert states["distill-model"] == "Failed"
    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    failed = client.search_runs(
        client.get_experiment_by_name("llm-tailor").experiment_id,
        filter_string="tags.`tailor.failed_stage` = 'distill'",
    )
    assert len(failed) == 1 and failed[0].info.status == "FAILED"
