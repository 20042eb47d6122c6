"""Checkpoint folders: atomic, fingerprinted, safe when two stages write the same one at once."""

from __future__ import annotations

import threading
import time

from tailor.store.checkpoint import existing_checkpoint, fingerprint_dir, write_checkpoint


def _writer(tag: str, started: threading.Barrier | None = None):
    def write(tmp):
        if started is not None:
            started.wait()
        (tmp / "weights.bin").write_bytes(b"same bytes from every writer" * 1000)
        time.sleep(0.2)  # both writers are mid-write at the same time
        (tmp / "config.json").write_text("{}")

    return write


def test_two_writers_of_the_same_checkpoint_end_with_one_complete_folder(tmp_path):
    folder = tmp_path / "checkpoints" / "pruned-x"
    barrier = threading.Barrier(2)
    refs, errors = [], []

    def run():
        try:
            refs.append(write_checkpoint(folder, _writer("t", barrier)))
        except Exception as exc:  # surfaced by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert refs[0] == refs[1] == existing_checkpoint(folder)
    assert refs[0].verify().fingerprint == fingerprint_dir(folder)
    assert sorted(p.name for p in folder.parent.iterdir()) == ["pruned-x"]  # no partial folders left


def test_a_failed_writer_leaves_nothing_that_looks_complete(tmp_path):
    folder = tmp_path / "ckpt"

    def broken(tmp):
        (tmp / "weights.bin").write_bytes(b"half")
        raise RuntimeError("killed mid-write")

    try:
        write_checkpoint(folder, broken)
    except RuntimeError:
        pass
    assert existing_checkpoint(folder) is None and list(tmp_path.iterdir()) == []
    assert write_checkpoint(folder, _writer("again")).verify()


def test_a_users_folder_at_the_checkpoint_path_is_never_deleted(tmp_path):
    import pytest

    from tailor.store.checkpoint import CheckpointError

    folder = tmp_path / "my-model"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    called = []
    with pytest.raises(CheckpointError, match="is not an llm-tailor checkpoint"):
        write_checkpoint(folder, lambda tmp: called.append(tmp))
    assert called == []  # refused before any work
    assert (folder / "notes.txt").read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["my-model"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert write_checkpoint(empty, _writer("into an empty folder")).verify()


def test_atomic_file_writes_leave_no_temporary_file_and_keep_the_old_file_on_failure(tmp_path):
    import pytest

    from tailor.store.checkpoint import write_file_atomically

    target = tmp_path / "report.json"
    write_file_atomically(target, lambda tmp: tmp.write_text("first"))

    def broken(tmp):
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        write_file_atomically(target, broken)
    assert target.read_text() == "first" and [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_tailor_distill_into_a_users_folder_fails_before_training_and_keeps_it(tmp_path, capsys):
    from tailor.cli import main
    from tailor.config.settings import ModelConfig
    from tailor.models.sources import materialize

    base = materialize(ModelConfig(source="tiny"), str(tmp_path))
    out = tmp_path / "results"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    code = main(["distill", "--teacher", base.path, "--student", base.path, "--out", str(out), "--profile", "smoke"])
    assert code == 2 and (out / "thesis.tex").read_text() == "years of work"
    assert "is not an llm-tailor checkpoint" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["thesis.tex"]


def test_tailor_distill_runs_one_phase_and_says_how_to_chain_more(tmp_path, capsys):
    from tailor.cli import main

    out = tmp_path / "out"
    args = ["--teacher", str(tmp_path), "--student", str(tmp_path), "--out", str(out), "--profile", "smoke"]
    code = main(["distill", *args, "--set", "distill.then=[{objective: logits}]"])
    assert code == 2 and not out.exists()
    assert "tailor distill runs one phase: run it once per phase" in capsys.readouterr().err


def test_the_same_weights_keep_one_fingerprint_however_long_training_took(tmp_path):
    from tailor.store.checkpoint import TRAINING_RECORD

    folders = []
    for seconds in (12.5, 99.0):
        folder = tmp_path / f"run-{seconds}"
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"the same weights")
        (folder / TRAINING_RECORD).write_text(f'{{"train_seconds": {seconds}}}')
        folders.append(folder)
    assert fingerprint_dir(folders[0]) == fingerprint_dir(folders[1])
    (folders[1] / "model.safetensors").write_bytes(b"other weights")
    assert fingerprint_dir(folders[0]) != fingerprint_dir(folders[1])
