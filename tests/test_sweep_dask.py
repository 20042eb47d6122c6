"""The sweep on a Dask cluster through prefect-dask: every combination's pruning and
evaluation run as tasks on the cluster's worker processes, with the thread runner's results."""

from __future__ import annotations

import json
import sys

import pytest

pytestmark = pytest.mark.integration

OVERRIDES = ["sweep.num_layers=[1,2]", "sweep.strategies=[last]", "sweep.distill_best=false", "runner.concurrent=true"]


def _sweep(work, shared_data, runner: str, address: str = "") -> list[dict]:
    from flows.runners import task_runner_for
    from flows.sweep_flow import sweep_flow
    from tailor.config.settings import load_config

    overrides = [f"work_dir={work}", f"data.data_dir={shared_data}", *OVERRIDES, *([runner] if runner else [])]
    cfg = load_config("smoke", overrides)
    assert cfg.runner.dask_address == address
    state = sweep_flow.with_options(task_runner=task_runner_for(cfg.runner))(
        profile="smoke", overrides=overrides, out_dir=str(work / "out"), return_state=True
    )
    assert state.is_completed(), state.message
    return json.loads((work / "out" / "sweep.json").read_text())["rows"]


def test_each_combination_runs_on_a_dask_worker_with_the_thread_runners_results(tmp_path, shared_data):
    pytest.importorskip("prefect_dask", reason="prefect-dask is in the test extra: pip install -e '.[test]'")
    from distributed import Client, LocalCluster

    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, memory_limit=0, dashboard_address=None
        ) as cluster,
        Client(cluster) as client,
    ):
        on_dask = _sweep(
            tmp_path / "dask",
            shared_data,
            f"runner.dask_address={cluster.scheduler_address}",
            cluster.scheduler_address,
        )
        # The workers unpickled and ran the pruning and evaluation tasks: their modules are loaded there.
        loaded = client.run(lambda: sorted(m for m in ("tasks.models", "tasks.measure") if m in sys.modules))
        assert len(loaded) == 2 and any(mods == ["tasks.measure", "tasks.models"] for mods in loaded.values()), loaded
    in_threads = _sweep(tmp_path / "threads", shared_data, "")
    assert [(r["strategy"], r["num_layers"], r["removed_layers"]) for r in on_dask] == [
        (r["strategy"], r["num_layers"], r["removed_layers"]) for r in in_threads
    ]
    # Same checkpoints, same documents: the same accuracies (speed is timed, so it differs).
    assert [r["acc_delta_pooled"] for r in on_dask] == [r["acc_delta_pooled"] for r in in_threads]


def test_dask_settings_are_checked_before_any_work():
    from tailor.config.settings import ConfigError, load_config

    with pytest.raises(ConfigError, match="runner.dask_workers .* or runner.dask_address"):
        load_config("smoke", ["runner.dask_workers=2", "runner.dask_address=tcp://127.0.0.1:8786"])
    with pytest.raises(ConfigError, match="runner.concurrent=true"):
        load_config("smoke", ["runner.dask_workers=2", "runner.concurrent=false"])
