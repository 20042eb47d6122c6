"""The recipe for watching runs live (README, docs/operations.md), followed literally: start `prefect server start`,
`prefect config set PREFECT_API_URL=...`, `tailor run`; the server then holds the flow run,
its task runs and its artifacts."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _api(url: str, path: str, body: dict | None = None):
    request = urllib.request.Request(
        f"{url}{path}",
        method="POST" if body is not None else "GET",
        data=json.dumps(body).encode() if body is not None else None,
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def _wait_healthy(url: str, server: subprocess.Popen, log_file, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"prefect server exited: {log_file.read_text()[-2000:]}")
        try:
            if _api(url, "/health") is True:
                return
        except OSError:
            pass
        time.sleep(1)
    pytest.fail(f"prefect server not healthy after {timeout} s: {log_file.read_text()[-2000:]}")


def test_runs_show_up_on_a_live_server_as_the_readme_says(tmp_path, shared_data):
    # A user's machine: Prefect's profile in ~/.prefect, no PREFECT_* variables.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_") and k != "TAILOR_HOME"}
    env["HOME"] = str(tmp_path / "home")
    (tmp_path / "home").mkdir()
    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    log_file = tmp_path / "server.log"
    server = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=log_file.open("w"),
        stderr=subprocess.STDOUT,
    )
    try:
        _wait_healthy(url, server, log_file)
        subprocess.run(
            [sys.executable, "-m", "prefect", "config", "set", f"PREFECT_API_URL={url}"],
            env=env,
            check=True,
            capture_output=True,
        )
        tailor = shutil.which("tailor") or pytest.fail("the tailor command is not installed")
        run = subprocess.run(
            [
                tailor,
                "run",
                "--profile",
                "smoke",
                "--set",
                f"work_dir={tmp_path / 'work'}",
                "--set",
                f"data.data_dir={shared_data}",
                "--out",
                str(tmp_path / "out"),
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=1200,
        )
        assert run.returncode == 0, run.stderr[-3000:]
        # The console a person follows: numbered start and end lines per stage, no third-party noise.
        console = run.stderr
        stages = re.findall(r"\[(\d+)/(\d+)\] (\S+) done in", console)
        assert stages[0][2] == "materialize", console[-3000:]
        assert {s for _, _, s in stages} >= {
            "prune",
            "distill",
            "evaluate",
            "measure-speed",
            "compare",
            "register",
            "promote",
        }, console[-3000:]
        assert {int(k) for k, _, _ in stages} == set(range(1, int(stages[0][1]) + 1))
        for noise in (
            "it/s]",
            "Loading weights",
            "fatal: not a git repository",
            "Beginning flow run",
            "Passed an already-initialized model",
            "bootstrapping for stddev",
        ):
            assert noise not in console, noise
            assert noise not in run.stdout, noise  # lm-eval prints some of it to stdout

        flow_runs = _api(url, "/flow_runs/filter", {})
        assert [r["state_type"] for r in flow_runs] == ["COMPLETED"]
        flow_run = flow_runs[0]
        task_runs = _api(url, "/task_runs/filter", {"flow_runs": {"id": {"any_": [flow_run["id"]]}}})
        names = [r["name"] for r in task_runs]  # a task's run is named "<task>-<suffix>" unless the flow names it
        for stage in (
            "materialize-model",
            "prune-model",
            "distill-model",
            "evaluate-models",
            "measure-speed",
            "compare-models",
            "register-model",
            "promote-model",
        ):
            assert any(n == stage or n.startswith(f"{stage}-") for n in names), (stage, names)
        assert all(r["state_type"] == "COMPLETED" for r in task_runs)
        artifacts = {a["key"] for a in _api(url, "/artifacts/filter", {}) if a.get("key")}
        assert {"tailor-comparison", "tailor-report", "mlflow-parent-run", "distillation-progress"} <= artifacts
        # Nothing went to a temporary server in the work folder instead.
        assert not (tmp_path / "work" / "prefect-home").exists()
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
