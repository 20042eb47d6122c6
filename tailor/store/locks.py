"""A lock between processes of one machine that dies with its holder.

Promotions of one registered model must not interleave (each reads the champion, then
moves the alias). Prefect's global concurrency limits serialise runs that share a Prefect
server; runs with their own temporary server (the default ``tailor run``) share nothing
but the file system, so they take this lock as well.
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

from tailor.common.layout import WorkDir
from tailor.config.settings import TailorError
from tailor.store.checkpoint import stable_hash


class LockTimeout(TailorError):
    """Another process held the lock for longer than the caller would wait."""


@contextmanager
def file_lock(path: Path, timeout_s: float = 600.0, poll_s: float = 0.2) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if missing, never deleted).

    The kernel drops the lock when its holder exits in any way, ``kill -9`` included,
    so a promotion killed while holding it never blocks later ones.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    handle.seek(0)
                    holder = handle.read().strip() or "unknown"
                    raise LockTimeout(
                        f"{path} has been held by another process ({holder}) for more than {timeout_s:.0f} s"
                    ) from None
                time.sleep(poll_s)
        try:
            # Who holds it, for the timeout message of a process that waits.
            handle.seek(0)
            handle.truncate()
            handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
            handle.flush()
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def promotion_lock_path(tracking_uri: str, model_name: str, work_dir: str) -> Path:
    """Where promotions of ``model_name`` in this tracking store meet: beside the store when it
    is a local file (so every work folder using it shares the lock), else in the work folder."""
    name = f"promotion-{stable_hash(tracking_uri, model_name)}.lock"
    parsed = urlparse(tracking_uri)
    if parsed.scheme == "sqlite":
        store = tracking_uri.removeprefix("sqlite:///").split("?")[0]
    elif parsed.scheme in ("", "file"):
        store = parsed.path or tracking_uri
    else:
        return WorkDir(work_dir).locks / name
    # A sibling folder: inside a file store MLflow would take it for an experiment.
    return Path(f"{store}.tailor-locks") / name
