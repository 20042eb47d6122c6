"""The console: numbered stage lines, sparse progress lines, third-party noise off unless verbose."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest

from tailor.common.console import Progress, Stages, format_seconds


@pytest.fixture
def lines(caplog, monkeypatch):
    tailor = logging.getLogger("tailor")
    monkeypatch.setattr(tailor, "propagate", False)  # records reach caplog once, through its own handler
    tailor.addHandler(caplog.handler)
    caplog.set_level(logging.INFO, logger="tailor")
    yield lambda: [r.getMessage() for r in caplog.records if r.name == "tailor"]
    tailor.removeHandler(caplog.handler)


def test_stages_print_position_and_summary(lines):
    stages = Stages(["materialize", "prune", "distill"])
    stages.start("prune")
    stages.done("prune", "layers [16, 17] removed")
    assert lines() == ["[2/3] prune ...", "[2/3] prune done in 0s: layers [16, 17] removed"]
    assert stages.current == "prune"


def test_stage_block_prints_its_name_once_with_the_detail_set_inside(lines):
    stages = Stages(["materialize", "prune"])
    with stages.stage("prune") as stage:
        assert lines() == ["[2/2] prune ..."]
        stage.detail = "layers [1] removed"
    assert lines() == ["[2/2] prune ...", "[2/2] prune done in 0s: layers [1] removed"]
    with stages.stage("materialize"):
        pass
    assert lines()[-1] == "[1/2] materialize done in 0s"


def test_a_failing_stage_block_prints_no_end_line_and_stays_current(lines):
    # The flow's failure hook reads ``current`` to name the stage that failed.
    stages = Stages(["materialize", "prune"])
    with pytest.raises(RuntimeError, match="boom"):
        with stages.stage("prune") as stage:
            stage.detail = "never shown"
            raise RuntimeError("boom")
    assert lines() == ["[2/2] prune ..."]
    assert stages.current == "prune"


def test_progress_is_sparse_and_leaves_the_end_to_the_stage_line(lines):
    progress = Progress("evaluate-original", total=1000, unit="requests", every_pct=25, min_seconds=0)
    for done in range(0, 1001, 10):
        progress.update(done)
    shown = lines()
    assert [line.split(": ")[1].split("%")[0] for line in shown] == ["25", "50", "75"]
    assert "(250/1,000 requests, about" in shown[0]


def test_progress_waits_between_lines(lines):
    progress = Progress("distill", total=10, unit="steps", every_pct=10, min_seconds=3600)
    for step in range(1, 10):
        progress.update(step)
    assert lines() == []


@pytest.mark.parametrize(("seconds", "text"), [(4.4, "4s"), (185, "3m05s"), (3720, "1h02m")])
def test_format_seconds(seconds, text):
    assert format_seconds(seconds) == text


def test_quiet_console_silences_libraries_but_not_errors():
    # A fresh interpreter: the settings apply at import time of the libraries.
    code = (
        "import logging, warnings\n"
        "from tailor.common.console import setup_console\n"
        "setup_console(verbose=False)\n"
        "import transformers\n"
        "transformers.logging.get_logger('transformers').warning('transformers-warning')\n"
        "logging.getLogger('lm_eval').warning('lm-eval-warning')\n"
        "logging.getLogger('lm_eval').error('lm-eval-error')\n"
        "warnings.warn('python-warning')\n"
        "logging.getLogger('tailor').info('tailor-line')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "tailor-line" in out.stderr and "lm-eval-error" in out.stderr
    for hidden in ("transformers-warning", "lm-eval-warning", "python-warning"):
        assert hidden not in out.stderr


@pytest.mark.parametrize("verbose", [False, True])
def test_lm_evals_own_prints_are_hidden_only_in_quiet_mode(verbose):
    # lm-eval prints "bootstrapping for stddev: ..." with print(), not through a logger.
    code = (
        "from tailor.common.console import setup_console, third_party_prints\n"
        f"setup_console(verbose={verbose})\n"
        "from lm_eval.api.metrics import bootstrap_stderr, mean\n"
        "with third_party_prints():\n"
        "    bootstrap_stderr(mean, [0.0, 1.0, 1.0], iters=10)\n"
        "print('our-result')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "DISABLE_MULTIPROC": "1"},
    )
    assert "our-result" in out.stdout
    assert ("bootstrapping for stddev" in out.stdout) == verbose, out.stdout


def test_overlapping_quiet_blocks_in_threads_give_stdout_back(monkeypatch, capsys):
    # Two evaluations run side by side: A enters, B enters, A leaves, B leaves. A plain
    # redirect_stdout per block would leave B's buffer in place of stdout for good.
    import threading

    from tailor.common import console

    monkeypatch.setattr(console, "_QUIET", True)
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()

    def a():
        with console.third_party_prints():
            print("hidden-a")
            a_in.set()
            b_in.wait()
        a_out.set()

    def b():
        a_in.wait()
        with console.third_party_prints():
            b_in.set()
            a_out.wait()
            print("hidden-b")

    threads = [threading.Thread(target=a), threading.Thread(target=b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print("after")
    out = capsys.readouterr().out
    assert "after" in out and "hidden" not in out
