"""The deployment recipe of docs/operations.md against a real `prefect server start` on loopback.

Server, work pool, `prefect deploy --all`, a process worker, a triggered `smoke` run:
the flow run completes through the worker and registers a model version.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"prefect server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"prefect server at {url} not healthy after {timeout} s")


@pytest.fixture()
def prefect_server(tmp_path):
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_API_URL": api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_LOGGING_LEVEL": "WARNING",
        # No scheduled runs of the other deployments (quick is on a daily cron) in this test.
        "PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "false",
    }
    log = (tmp_path / "server.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        _wait_healthy(api, server)
        yield env, api
    finally:
        server.terminate()
        server.wait(timeout=60)


def _prefect(env, *args, timeout=300) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "prefect", *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, f"prefect {' '.join(args)}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_deployed_smoke_run_completes_through_a_worker(prefect_server, tmp_path, shared_data):
    env, api = prefect_server
    _prefect(env, "work-pool", "create", "tailor-pool", "--type", "process")
    _prefect(env, "--no-prompt", "deploy", "--all")
    worker_log = (tmp_path / "worker.log").open("w")
    worker = subprocess.Popen(
        [sys.executable, "-m", "prefect", "worker", "start", "--pool", "tailor-pool"],
        env=env,
        cwd=tmp_path,
        stdout=worker_log,
        stderr=subprocess.STDOUT,
    )
    try:
        work = tmp_path / "work"
        params = {"overrides": [f"work_dir={work}", f"data.data_dir={shared_data}"]}
        out = _prefect(
            env,
            "deployment",
            "run",
            "llm-tailor/smoke",
            "--params",
            json.dumps(params),
            "--watch",
            "--watch-timeout",
            "900",
            timeout=960,
        )
    finally:
        worker.terminate()
        try:
            worker.wait(timeout=60)
        except subprocess.TimeoutExpired:  # a slow shutdown on a loaded machine is not what this test checks
            worker.kill()
            worker.wait()
    assert "Completed" in out, out + (tmp_path / "worker.log").read_text()[-3000:]

    request = urllib.request.Request(
        f"{api}/flow_runs/filter", data=b"{}", method="POST", headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as r:
        runs = json.loads(r.read())
    assert [run["state"]["type"] for run in runs if run["name"]] == ["COMPLETED"]
    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    version = client.get_model_version_by_alias("tailor-smoke", "challenger")
    assert version.tags["profile"] == "smoke"
