"""`tailor deployments check`: prefect.yaml problems named before `prefect deploy`."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from flows.deployments import DeploymentError, check_deployments

REPO_YAML = Path(__file__).resolve().parents[1] / "prefect.yaml"


def test_the_shipped_prefect_yaml_is_valid():
    assert set(check_deployments(REPO_YAML, check_pools=False)) >= {"smoke", "quick", "book", "sweep-quick"}


def _variant(tmp_path, **changes) -> Path:
    spec = yaml.safe_load(REPO_YAML.read_text())
    quick = next(d for d in spec["deployments"] if d["name"] == "quick")
    for key, value in changes.items():
        quick[key] = value
    path = tmp_path / "prefect.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_an_invalid_cron_string_is_named(tmp_path):
    path = _variant(tmp_path, schedules=[{"cron": "61 3 * * *", "timezone": "UTC"}])
    with pytest.raises(DeploymentError, match=r"deployment 'quick': schedule cron '61 3 \* \* \*' is invalid"):
        check_deployments(path, check_pools=False)


def test_bad_parameters_are_named(tmp_path):
    path = _variant(tmp_path, parameters={"profile": "quick", "overrides": ["eval.limt=3"]})
    with pytest.raises(DeploymentError, match=r"deployment 'quick': parameters: .*eval.limt"):
        check_deployments(path, check_pools=False)


@pytest.mark.integration
def test_an_unknown_work_pool_lists_the_existing_ones(tmp_path):
    path = _variant(tmp_path, work_pool={"name": "no-such-pool"})
    with pytest.raises(DeploymentError, match=r"work pool 'no-such-pool' does not exist on the Prefect server"):
        check_deployments(path)
