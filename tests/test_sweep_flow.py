"""The pruning sweep through a real Prefect flow and a real MLflow store, on the tiny model."""

from __future__ import annotations

import json

import pytest
from mlflow.tracking import MlflowClient

from tailor.report.sweep import BEST_RULE

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, shared_data):
    from flows.sweep_flow import sweep_flow

    work = tmp_path_factory.mktemp("sweep")
    state = sweep_flow(
        profile="smoke",
        overrides=[
            f"work_dir={work}",
            f"data.data_dir={shared_data}",
            "sweep.num_layers=[1,2]",
            "sweep.strategies=[last,block_influence,angular]",
            "prune.calibration_samples=8",
            "prune.calibration_batch_size=4",
            "sweep.distill_best=true",
        ],
        out_dir=str(work / "out"),
        return_state=True,
    )
    assert state.is_completed(), state.message
    return work, state.result()


def test_every_combination_is_compared_with_intervals(sweep):
    work, result = sweep
    report = json.loads((work / "out" / "sweep.json").read_text())
    rows = report["rows"]
    assert {(r["strategy"], r["num_layers"]) for r in rows} == {
        (s, n) for s in ("last", "block_influence", "angular") for n in (1, 2)
    }
    for r in rows:
        assert len(r["removed_layers"]) == r["num_layers"]
        pooled = r["acc_delta_pooled"]
        assert pooled["ci_low"] <= pooled["delta"] <= pooled["ci_high"]
        assert r["params_saved_pct"] > 0 and r["speedup"] > 0
    assert [r["removed_layers"] for r in rows if r["strategy"] == "last"] == [[3], [2, 3]]
    # The stated rule: most layers removed, then the highest retention.
    most = [r for r in rows if r["num_layers"] == 2]
    assert report["best_rule"] == BEST_RULE
    assert report["best"]["mean_acc_retention_pct"] == max(r["mean_acc_retention_pct"] for r in most)
    assert (work / "out" / "sweep_retention.png").stat().st_size > 1000
    assert "| strategy |" in (work / "out" / "sweep.md").read_text()


def test_table_and_plot_reach_prefect_and_mlflow(sweep):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    work, result = sweep
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["sweep-table", "sweep-report"]))
        )
    kinds = {a.key: a for a in artifacts}
    assert kinds["sweep-table"].type == "table" and kinds["sweep-report"].type == "markdown"
    assert "data:image/png;base64," in kinds["sweep-report"].data
    mlflow = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    parent = mlflow.get_run(result["parent_run_id"])
    assert parent.data.tags["tailor.best"] == f"{result['best']['strategy']}:{result['best']['num_layers']}"
    child = mlflow.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )[0]
    files = {f.path for f in mlflow.list_artifacts(child.info.run_id)}
    assert {"sweep_retention.png", "sweep.md", "sweep.json", "layer_scores_n2.png"} <= files
    assert "last.n2.mean_acc_retention_pct" in child.data.metrics


def test_best_combination_feeds_the_whole_cycle(sweep):
    work, result = sweep
    cycle = result["cycle"]
    report = json.loads(open(cycle["report_json"]).read())
    assert report["config"]["prune"]["strategy"] == result["best"]["strategy"]
    assert report["pruning"]["removed_layers"] == result["best"]["removed_layers"]
    assert report["models"]["distilled"]["layers"] == 2
