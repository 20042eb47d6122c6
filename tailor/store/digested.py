"""Files written with their sha256 recorded beside them (``NAME.sha256``).

For large single-file artifacts (token sets, the teacher's top-k cache) that stages hand on
by path: a reader can tell a file still as it was written from one edited, truncated or
deleted since, without a fingerprint of its own in the file."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable

from tailor.store.checkpoint import write_file_atomically

DIGEST_SUFFIX = ".sha256"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def digest_file(path: Path) -> Path:
    return path.with_name(path.name + DIGEST_SUFFIX)


def write_digested(path: Path, writer: Callable[[Path], None]) -> str:
    """``writer(tmp)``, then the file's sha256 record, each written atomically; returns the digest.
    The old record goes first: a kill in between leaves a file without one, which counts as
    not written."""
    path = Path(path)
    digest_file(path).unlink(missing_ok=True)
    digest = {}

    def write(tmp: Path) -> None:
        writer(tmp)
        digest["sha256"] = sha256_file(tmp)

    write_file_atomically(path, write)
    write_file_atomically(digest_file(path), lambda tmp: tmp.write_text(digest["sha256"] + "\n"))
    return digest["sha256"]


def recorded_digest(path: Path) -> str | None:
    """The sha256 recorded when ``path`` was written, or None if there is no record."""
    record = digest_file(Path(path))
    return record.read_text().strip() if record.is_file() else None


def is_intact(path: Path) -> bool:
    """``path`` is there and still has the sha256 recorded when it was written."""
    path = Path(path)
    recorded = recorded_digest(path)
    return path.is_file() and recorded is not None and sha256_file(path) == recorded
