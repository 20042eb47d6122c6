"""`tailor run`'s inputs that used to fail only after the heavy stages: the report folder (--out)
and more data-parallel processes than GPUs, both checked in preflight."""

from __future__ import annotations

import json

import pytest

from tailor.cli import main
from tailor.config.settings import ConfigError, TailorError, load_config
from tailor.preflight import preflight


def _cfg(tmp_path, unit_data, *overrides: str):
    return load_config("smoke", [f"work_dir={tmp_path / 'work'}", f"data.data_dir={unit_data}", *overrides])


def test_a_report_folder_that_is_a_file_or_someone_elses_fails_in_preflight(tmp_path, unit_data):
    cfg = _cfg(tmp_path, unit_data)
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine\n")
    with pytest.raises(ConfigError, match=f"--out {a_file} is a file"):
        preflight(cfg, out_dir=str(a_file))
    with pytest.raises(ConfigError, match=f"--out {a_file / 'report'} cannot be created: {a_file} is a file"):
        preflight(cfg, out_dir=str(a_file / "report"))
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "accuracy.png").write_text("a figure of their own\n")
    with pytest.raises(ConfigError, match=f"--out {theirs} holds files that are not an llm-tailor report"):
        preflight(cfg, out_dir=str(theirs))
    assert a_file.read_text() == "mine\n" and (theirs / "accuracy.png").read_text() == "a figure of their own\n"


def test_a_new_empty_or_earlier_report_folder_passes(tmp_path, unit_data):
    cfg = _cfg(tmp_path, unit_data)
    preflight(cfg, out_dir=str(tmp_path / "new" / "report"))
    assert not (tmp_path / "new").exists()  # checked, not created: a failed run leaves nothing
    (tmp_path / "empty").mkdir()
    preflight(cfg, out_dir=str(tmp_path / "empty"))
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "report.json").write_text(json.dumps({"profile": "smoke"}))
    (earlier / "accuracy.png").write_text("the earlier run's figure\n")
    preflight(cfg, out_dir=str(earlier))  # a re-run replaces its own report
    preflight(cfg)  # no --out: the work folder's reports/


def test_tailor_run_checks_its_out_folder_before_the_flow(tmp_path, unit_data, monkeypatch, capsys):
    import tailor.cli

    seen = {}

    def stop(cfg, out_dir=None):
        seen["out_dir"] = out_dir
        raise TailorError("stopped before the flow")

    monkeypatch.setattr(tailor.cli, "preflight", stop)
    out = tmp_path / "out"
    assert main(["run", "--profile", "smoke", "--set", f"work_dir={tmp_path}", "--out", str(out)]) == 2
    assert seen == {"out_dir": str(out)}


def test_more_data_parallel_processes_than_gpus_fail_in_preflight(tmp_path, unit_data, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    preflight(_cfg(tmp_path, unit_data, "distill.nproc_per_node=2"))
    with pytest.raises(ConfigError, match=r"distill.nproc_per_node=3 exceeds the 2 GPUs .*allowed: 1 to 2"):
        preflight(_cfg(tmp_path, unit_data, "distill.nproc_per_node=3"))
    # Without CUDA the processes run on the CPU (gloo): any number.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    preflight(_cfg(tmp_path, unit_data, "distill.nproc_per_node=3"))
