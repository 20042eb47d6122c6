"""A plain (non-editable) install: the profiles ship inside the package and the smoke flow runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]


def test_a_wheel_install_lists_settings_and_runs_the_smoke_profile(tmp_path, shared_data):
    venv = tmp_path / "venv"
    # The heavy dependencies come from this environment; the project itself is built and
    # installed as a wheel into the venv, which takes precedence over the editable copy.
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    python, tailor = venv / "bin" / "python", venv / "bin" / "tailor"
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", str(REPO)], check=True, cwd=tmp_path)
    where = subprocess.run(
        [python, "-c", "import tailor; print(tailor.__file__)"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert where.startswith(str(venv)), where

    settings = subprocess.run([tailor, "settings"], cwd=tmp_path, capture_output=True, text=True)
    assert settings.returncode == 0 and "distill.corpus_mix" in settings.stdout
    run = subprocess.run(
        [
            tailor,
            "run",
            "--profile",
            "smoke",
            "--out",
            str(tmp_path / "out"),
            "--set",
            f"work_dir={tmp_path / 'work'}",
            "--set",
            f"data.data_dir={shared_data}",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["profile"] == "smoke" and set(report["models"]) == {"original", "pruned", "distilled"}
