"""Checkpoint folders: atomic, fingerprinted, safe when two stages write the same one at once."""

from __future__ import annotations

import threading
import time

from tailor.checkpoint import existing_checkpoint, fingerprint_dir, write_checkpoint


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
