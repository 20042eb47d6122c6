"""Temporary names that clean up after a killed writer.

A checkpoint folder or file is written under a temporary name beside its final one and
renamed into place. A writer killed mid-write (SIGKILL, power loss) leaves that temporary
behind. Each writer holds an exclusive ``flock`` on its temporary for as long as it writes;
the kernel drops the lock when the process dies, however it dies. So a later writer of the
same name can tell an abandoned temporary (its lock can be taken) from one another process
is still writing (it cannot), and deletes only the abandoned ones. Only names this module
made are ever deleted: they carry the final name, a marker and a random part.
"""

from __future__ import annotations

import fcntl
import glob
import os
import re
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

# A writer takes its lock right after creating its temporary; a younger one is left alone
# in case its lock is not taken yet.
_GRACE_S = 5.0
# The random part of tempfile's names, and of uuid4().hex[:8] for stale folders.
_RANDOM = "[a-z0-9_]{8}"


def folder_prefix(final: Path) -> str:
    return f"{final.name}.partial-"


def file_affixes(final: Path) -> tuple[str, str]:
    return f".{final.name}.", ".partial"


def stale_prefix(final: Path) -> str:
    """Damaged checkpoints of ours moved aside to be deleted (never locked: nobody writes them)."""
    return f"{final.name}.stale-"


@contextmanager
def claimed_folder(final: Path) -> Iterator[Path]:
    """A new empty folder beside ``final``, locked while the block runs, removed after it
    (the caller renames it into place first if it should stay)."""
    sweep_abandoned(final.parent, folder_prefix(final))
    sweep_abandoned(final.parent, stale_prefix(final))
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=folder_prefix(final)))
    fd = _locked(tmp)
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        os.close(fd)


@contextmanager
def claimed_file(final: Path) -> Iterator[Path]:
    """A new empty file beside ``final``, locked while the block runs, removed after it
    unless the caller renamed it into place."""
    prefix, suffix = file_affixes(final)
    sweep_abandoned(final.parent, prefix, suffix)
    fd, name = tempfile.mkstemp(dir=final.parent, prefix=prefix, suffix=suffix)
    tmp = Path(name)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield tmp
    finally:
        tmp.unlink(missing_ok=True)
        os.close(fd)


def sweep_abandoned(parent: Path, prefix: str, suffix: str = "") -> list[Path]:
    """Delete the temporaries in ``parent`` named ``prefix…suffix`` whose writer is gone;
    returns what was deleted."""
    removed = []
    ours = re.compile(re.escape(prefix) + _RANDOM + re.escape(suffix))
    for path in Path(parent).glob(f"{glob.escape(prefix)}*{glob.escape(suffix)}"):
        if not ours.fullmatch(path.name):
            continue  # not a name we make
        try:
            if time.time() - path.lstat().st_mtime < _GRACE_S:
                continue
            fd = os.open(path, os.O_RDONLY)
        except OSError:  # gone already, or not ours to open
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a live writer holds it
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
        finally:
            os.close(fd)
    return removed


def _locked(path: Path) -> int:
    fd = os.open(path, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd
