"""A writer killed mid-write leaves a temporary name; the next writer of that name removes
it, never one another process is still writing, never a name we did not make."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tailor.store import temporary
from tailor.store.checkpoint import FINGERPRINT_FILE, write_checkpoint, write_file_atomically

# Starts writing `final` (a checkpoint folder or a file), says so, and hangs until killed.
_HANGING_WRITER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from tailor.store.checkpoint import write_checkpoint, write_file_atomically

    def hang(tmp):
        (tmp / "half.bin" if tmp.is_dir() else tmp).write_bytes(b"half")
        print("writing", flush=True)
        time.sleep(600)

    kind, final = sys.argv[1], Path(sys.argv[2])
    (write_checkpoint if kind == "folder" else write_file_atomically)(final, hang)
    """
)


class _Writer:
    def __init__(self, kind: str, final: Path):
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _HANGING_WRITER, kind, str(final)], stdout=subprocess.PIPE, text=True
        )
        assert self.proc.stdout.readline().strip() == "writing"

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.proc.poll() is None:
            self.kill()


def _temporaries(final: Path) -> list[str]:
    return sorted(p.name for p in final.parent.iterdir() if p.name != final.name)


@pytest.fixture
def no_grace(monkeypatch):
    monkeypatch.setattr(temporary, "_GRACE_S", 0.0)


def _one_file(tmp: Path) -> None:
    (tmp / "weights.bin").write_bytes(b"whole")


def test_a_checkpoint_folder_a_killed_writer_left_is_removed_by_the_next_write(tmp_path, no_grace):
    final = tmp_path / "checkpoints" / "pruned-0123"
    final.parent.mkdir()
    with _Writer("folder", final) as w:
        w.kill()
    (left,) = _temporaries(final)
    assert left.startswith(f"{final.name}.partial-")

    ref = write_checkpoint(final, _one_file)

    assert _temporaries(final) == []
    assert (final / "weights.bin").read_bytes() == b"whole" and (final / FINGERPRINT_FILE).exists()
    assert ref.verify(contents=True)


def test_a_file_a_killed_writer_left_is_removed_by_the_next_write(tmp_path, no_grace):
    final = tmp_path / "answers.json"
    with _Writer("file", final) as w:
        w.kill()
    (left,) = _temporaries(final)
    assert left.startswith(f".{final.name}.") and left.endswith(".partial")

    write_file_atomically(final, lambda tmp: tmp.write_text("{}"))

    assert _temporaries(final) == [] and final.read_text() == "{}"


@pytest.mark.parametrize("kind", ["folder", "file"])
def test_a_temporary_another_process_is_writing_is_left_alone(tmp_path, no_grace, kind):
    final = tmp_path / "pruned-0123"
    with _Writer(kind, final) as w:
        (left,) = _temporaries(final)
        prefix, suffix = (temporary.folder_prefix(final), "") if kind == "folder" else temporary.file_affixes(final)
        assert temporary.sweep_abandoned(tmp_path, prefix, suffix) == []
        assert _temporaries(final) == [left]
        w.kill()
    assert [p.name for p in temporary.sweep_abandoned(tmp_path, prefix, suffix)] == [left]
    assert _temporaries(final) == []


def test_names_we_do_not_make_are_never_removed(tmp_path, no_grace):
    final = tmp_path / "pruned-0123"
    users = [
        f"{final.name}.partial-notes",
        f"{final.name}.partial-draft-v2",
        f"{final.name}.stale-",
        "other.partial-abcd1234",
    ]
    for name in users:
        (tmp_path / name).mkdir()
    write_checkpoint(final, _one_file)
    assert _temporaries(final) == sorted(users)


def test_a_young_temporary_is_left_for_its_writer_to_lock(tmp_path):
    final = tmp_path / "pruned-0123"
    young = tmp_path / f"{final.name}.partial-abcd1234"
    young.mkdir()  # as mkdtemp leaves it, a moment before its writer locks it
    assert temporary.sweep_abandoned(tmp_path, temporary.folder_prefix(final)) == []
    assert young.is_dir()
