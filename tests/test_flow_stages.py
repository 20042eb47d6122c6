"""What the flows share, without running a flow: the MLflow bookkeeping's retries, the console
lines' way into Prefect, the run links."""

from __future__ import annotations

import logging
import warnings

import pytest

from flows import stages
from tailor.common.console import LOGGER


def test_retried_tries_again_after_each_delay_then_gives_up(monkeypatch):
    monkeypatch.setattr(stages.time, "sleep", lambda s: None)
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise OSError("store away")
        return "run-id"

    assert stages.retried(flaky, (2, 5, 10), "child run") == "run-id" and len(calls) == 3

    def down():
        calls.append(1)
        raise OSError("down")

    calls.clear()
    with pytest.raises(OSError, match="down"):
        stages.retried(down, (2, 5), "child run")
    assert len(calls) == 3  # the first try and one per delay


def test_console_lines_outside_a_run_are_not_sent_and_do_not_warn(monkeypatch):
    sent = []
    monkeypatch.setattr(stages.APILogHandler, "emit", lambda self, record: sent.append(record))
    handler = stages.PrefectRunLog()
    record = logging.LogRecord("tailor", logging.INFO, __file__, 1, "[1/3] prune ...", None, None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        handler.emit(record)
    assert sent == []
    record.flow_run_id = "2b1f0e7c-0000-4000-8000-000000000000"  # a failure hook names its run
    handler.emit(record)
    assert sent == [record]


def test_console_goes_to_prefect_through_one_handler_at_info(monkeypatch):
    monkeypatch.setattr(LOGGER, "handlers", list(LOGGER.handlers))
    level = LOGGER.level
    LOGGER.setLevel(logging.NOTSET)  # a deployment's run: no setup_console
    try:
        stages.send_console_to_prefect()
        stages.send_console_to_prefect()  # a subflow
        assert sum(isinstance(h, stages.PrefectRunLog) for h in LOGGER.handlers) == 1
        assert LOGGER.isEnabledFor(logging.INFO)
    finally:
        LOGGER.setLevel(level)  # setLevel, not an attribute: it also clears the logging module's cache


def test_run_link_opens_the_model_training_view():
    # MLflow 3.x's UI opens experiments in its GenAI view unless the URL asks otherwise.
    assert (
        stages.run_link("sqlite:///w/mlflow.db", "3", "abc")
        == "http://127.0.0.1:5000/#/experiments/3/runs/abc?workflowType=machine_learning"
    )
    assert stages.run_link("http://mlflow:8080/", "3", "abc").startswith("http://mlflow:8080/#/experiments/3/runs/abc?")
