"""A lock that lives with the MLflow registry: one holder per registered model, whatever the tracking URI.

Promotions of one registered model must not interleave (each reads the champion, then moves the
alias), and the promoters may share nothing but the registry: two work folders, two temporary
Prefect servers, two machines talking to one ``mlflow server``. So the lock is kept where they all
meet, as tags on the registered model, and the same code serves a local sqlite store and a remote
server.

MLflow's registry has no conditional write (tags and aliases are plain upserts), so a single lock
tag written and read back cannot exclude: two promoters may both read "free", then both write, and
the later one's read-back shows its own value. Each promoter writes its own tag instead,
``tailor.promotion.lock.<owner>``, then reads the registered model's tags and holds the lock only
when no other live lock tag is there; otherwise it deletes its tag, backs off for a random time and
tries again. Because each write comes before its own read, of two promoters that overlap at least
one sees the other's tag, so they cannot both go ahead. That needs reads that see every committed
write: one database behind sqlite or the server, not a lagging read replica.

Each tag holds a lease: its holder stops acting ``lease_s`` after it began acquiring (its own
monotonic clock) and deletes the tag in ``finally``. A holder killed with ``kill -9`` leaves its
tag behind; others take it for stale once they have seen it unchanged for its lease (their own
monotonic clock, so no clock needs to agree), or at once when its wall-clock expiry is a further
lease in the past (machines' clocks within a lease of each other), and delete it.
"""

from __future__ import annotations

import json
import os
import random
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from tailor.config.settings import TailorError

LOCK_TAG_PREFIX = "tailor.promotion.lock."


class LockTimeout(TailorError):
    """Another promoter held the lock for longer than the caller would wait."""


class LockLost(TailorError):
    """The holder's lease ran out (or its tag was removed) before its work was done."""


@dataclass
class Lease:
    """A held registry lock: ``check`` before each write that needs the lock."""

    client: MlflowClient
    model_name: str
    key: str
    value: str
    lease_s: float
    deadline: float  # monotonic: the holder acts only before this
    margin_s: float  # left for one registry write to land before the deadline

    def remaining_s(self) -> float:
        return self.deadline - time.monotonic()

    def check(self, verify: bool = True) -> None:
        """Raise ``LockLost`` unless the lease has time left and (``verify``) our tag is still in the registry."""
        if self.remaining_s() < self.margin_s:
            raise LockLost(
                f"the promotion lock on {self.model_name!r} ran past its {self.lease_s:.0f} s lease; "
                "stopped before moving anything else"
            )
        if verify and _lock_tags(self.client, self.model_name).get(self.key) != self.value:
            raise LockLost(f"the promotion lock on {self.model_name!r} was taken from this promoter (lease expired)")


@contextmanager
def registry_lock(
    client: MlflowClient,
    model_name: str,
    lease_s: float = 120.0,
    timeout_s: float = 600.0,
    poll_s: float = 0.5,
) -> Iterator[Lease]:
    """Hold the promotion lock of ``model_name`` in its registry for at most ``lease_s`` seconds.

    Waits up to ``timeout_s`` for another holder (``LockTimeout`` names it); the lock tag is
    deleted on the way out, however the block ends.
    """
    owner = uuid.uuid4().hex
    key = LOCK_TAG_PREFIX + owner
    first_seen: dict[tuple[str, str], float] = {}
    give_up = time.monotonic() + timeout_s
    while True:
        rivals = _live_rivals(client, model_name, key, lease_s, first_seen)
        if not rivals:
            started = time.monotonic()
            value = json.dumps(
                {
                    "owner": owner,
                    "holder": f"pid {os.getpid()} on {socket.gethostname()}",
                    "expires": time.time() + lease_s,
                    "lease_s": lease_s,
                }
            )
            try:
                client.set_registered_model_tag(model_name, key, value)
                tags = _lock_tags(client, model_name)
                rivals = _live_rivals(client, model_name, key, lease_s, first_seen, tags)
                held = tags.get(key) == value and not rivals
            except BaseException:
                _delete(client, model_name, key)
                raise
            if held:
                lease = Lease(client, model_name, key, value, lease_s, started + lease_s, min(10.0, lease_s / 4))
                try:
                    yield lease
                finally:
                    _delete(client, model_name, key)
                return
            _delete(client, model_name, key)  # overlapped with another promoter: both step back
        if time.monotonic() >= give_up:
            holders = ", ".join(_describe(v) for v in rivals.values()) or "unknown"
            raise LockTimeout(
                f"the promotion lock on registered model {model_name!r} has been held by another promoter "
                f"({holders}) for more than {timeout_s:.0f} s"
            )
        time.sleep(poll_s * random.uniform(0.5, 1.5))  # random, so two that stepped back do not meet again


def _lock_tags(client: MlflowClient, model_name: str) -> dict[str, str]:
    tags = client.get_registered_model(model_name).tags
    return {k: v for k, v in tags.items() if k.startswith(LOCK_TAG_PREFIX)}


def _live_rivals(
    client: MlflowClient,
    model_name: str,
    key: str,
    lease_s: float,
    first_seen: dict[tuple[str, str], float],
    tags: dict[str, str] | None = None,
) -> dict[str, str]:
    """Other promoters' lock tags that are not stale; stale ones are deleted."""
    tags = _lock_tags(client, model_name) if tags is None else tags
    now, live = time.monotonic(), {}
    for other, value in tags.items():
        if other == key:
            continue
        seen = first_seen.setdefault((other, value), now)
        try:
            info = json.loads(value)
            their_lease, expires = float(info["lease_s"]), float(info["expires"])
        except (ValueError, TypeError, KeyError):
            their_lease, expires = lease_s, float("inf")  # not ours to read: judged by what we see
        if now - seen >= their_lease or time.time() > expires + their_lease:
            _delete(client, model_name, other)  # its holder has stopped: a lease never outlives itself
        else:
            live[other] = value
    return live


def _delete(client: MlflowClient, model_name: str, key: str) -> None:
    """Best effort: a tag left behind expires with its lease."""
    try:
        client.delete_registered_model_tag(model_name, key)
    except MlflowException:
        pass


def _describe(value: str) -> str:
    try:
        info = json.loads(value)
        left = float(info["expires"]) - time.time()
        return f"{info['holder']}, lease {'ends in' if left >= 0 else 'ended'} {abs(left):.0f} s"
    except (ValueError, TypeError, KeyError):
        return value[:200]
