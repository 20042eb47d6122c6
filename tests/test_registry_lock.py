"""One champion per registry, whatever the tracking URI: the promotion lock lives in the registry.

Promoters that share nothing but the registry (threads with their own clients, processes with their
own work folders and Prefect state, a local sqlite store or an ``mlflow server``) take turns; a
holder killed with ``kill -9`` leaves a lease that expires; the alias moves only from the champion
the decision was made against. Real MLflow stores throughout: faults are injected on our side.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest
from mlflow.tracking import MlflowClient

import tailor.registry.promotion as promotion
from tailor.config.settings import PromotionConfig
from tailor.registry.promotion import promote

NAME = "lock-test"
GATE = PromotionConfig(min_mean_retention_pct=90, min_speedup=1.05, max_task_drop=0.05)
ORIGINAL = {"arc_easy": 0.60, "hellaswag": 0.40}
LOCK_PREFIX = "tailor.promotion.lock."


def _tags(acc: dict[str, float], speedup: float = 1.10, signature: str = "sig") -> dict:
    retention = sum(100 * acc[t] / ORIGINAL[t] for t in acc) / len(acc)
    return {
        "tailor.eval_signature": signature,
        "tailor.mean_acc_retention_pct": str(retention),
        "tailor.speedup": str(speedup),
        **{f"tailor.acc.{t}": str(v) for t, v in acc.items()},
        **{f"tailor.original_acc.{t}": str(v) for t, v in ORIGINAL.items()},
    }


def _make_registry(uri: str, source: str) -> tuple[MlflowClient, callable]:
    client = MlflowClient(uri, registry_uri=uri)
    client.create_registered_model(NAME)

    def add(tags: dict) -> str:
        return str(client.create_model_version(NAME, source=source, tags=tags).version)

    return client, add


@pytest.fixture()
def registry(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    (tmp_path / "weights").mkdir()
    client, add = _make_registry(uri, str(tmp_path / "weights"))
    return uri, client, add


def _champion(client) -> str | None:
    try:
        return str(client.get_model_version_by_alias(NAME, "champion").version)
    except Exception:
        return None


def _lock_tags(client) -> dict[str, str]:
    return {k: v for k, v in client.get_registered_model(NAME).tags.items() if k.startswith(LOCK_PREFIX)}


def _slow_decide(monkeypatch, seconds: float = 1.0):
    real_decide = promotion.decide

    def slow(*args, **kwargs):  # widen the window between reading the champion and moving it
        time.sleep(seconds)
        return real_decide(*args, **kwargs)

    monkeypatch.setattr(promotion, "decide", slow)


def test_two_promoters_racing_on_one_sqlite_registry_move_champion_once(registry, monkeypatch):
    # Two equally good challengers evaluated differently: whichever is judged second sees a champion it
    # cannot compare with and is refused, so serialised promoters move the alias exactly once.
    uri, client, add = registry
    a = add(_tags({"arc_easy": 0.60, "hellaswag": 0.40}, signature="limit-100"))
    b = add(_tags({"arc_easy": 0.60, "hellaswag": 0.40}, signature="limit-200"))
    _slow_decide(monkeypatch)
    start, decisions, errors = threading.Barrier(2), {}, []

    def racer(version: str) -> None:
        try:
            own = MlflowClient(uri, registry_uri=uri)  # nothing shared but the registry
            start.wait()
            decisions[version] = promote(own, NAME, version, GATE)
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=racer, args=(v,)) for v in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    promoted = [d for d in decisions.values() if d.promoted]
    refused = [d for d in decisions.values() if not d.promoted]
    assert len(promoted) == 1 and len(refused) == 1, decisions
    winner = promoted[0].version
    assert promoted[0].previous_champion is None and _champion(client) == winner
    assert refused[0].previous_champion == winner and any("not comparable" in r for r in refused[0].reasons)
    assert _lock_tags(client) == {}


def test_a_live_lease_of_another_promoter_makes_others_wait_and_names_it(registry):
    from tailor.store.locks import LockTimeout, registry_lock

    _, client, _ = registry
    holder = {"owner": "x", "holder": "pid 4242 on ci-box", "expires": time.time() + 600, "lease_s": 600}
    client.set_registered_model_tag(NAME, LOCK_PREFIX + "x", json.dumps(holder))
    started = time.monotonic()
    with pytest.raises(LockTimeout, match="pid 4242 on ci-box, lease ends in"):
        with registry_lock(client, NAME, timeout_s=1.0, poll_s=0.1):
            pass
    assert time.monotonic() - started < 10
    assert list(_lock_tags(client)) == [LOCK_PREFIX + "x"]  # a live lease is left alone; ours is gone


def test_a_lease_whose_expiry_has_long_passed_is_removed_at_once(registry):
    _, client, add = registry
    v = add(_tags({"arc_easy": 0.58, "hellaswag": 0.39}))
    dead = {"owner": "y", "holder": "pid 1 on gone", "expires": time.time() - 3600, "lease_s": 120}
    client.set_registered_model_tag(NAME, LOCK_PREFIX + "y", json.dumps(dead))
    started = time.monotonic()
    assert promote(client, NAME, v, GATE, lock_timeout_s=5).promoted
    assert time.monotonic() - started < 5 and _lock_tags(client) == {}


_HOLDER = """
import sys, time
from mlflow.tracking import MlflowClient
from tailor.store.locks import registry_lock

uri, name = sys.argv[1:3]
with registry_lock(MlflowClient(uri, registry_uri=uri), name, lease_s=3.0):
    print("held", flush=True)
    time.sleep(600)
"""


def test_a_holder_killed_with_sigkill_blocks_the_next_promoter_for_one_lease_at_most(registry):
    from tailor.store.locks import LockTimeout, registry_lock

    uri, client, add = registry
    v = add(_tags({"arc_easy": 0.58, "hellaswag": 0.39}))
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, uri, NAME], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LockTimeout, match=f"pid {holder.pid} on"):
            with registry_lock(client, NAME, timeout_s=0.5, poll_s=0.1):
                pass
    finally:
        holder.kill()  # SIGKILL: its finally never runs, its tag stays in the registry
        holder.wait()
    left = _lock_tags(client)
    assert len(left) == 1 and f"pid {holder.pid}" in next(iter(left.values()))
    started = time.monotonic()
    decision = promote(client, NAME, v, GATE, lock_timeout_s=30)
    waited = time.monotonic() - started
    assert decision.promoted and _champion(client) == v
    assert 1.0 < waited < 15, waited  # seen unchanged for its 3 s lease, then taken for stale
    assert _lock_tags(client) == {}


def test_a_holder_past_its_lease_moves_nothing(registry, monkeypatch):
    from tailor.store.locks import LockLost

    _, client, add = registry
    v = add(_tags({"arc_easy": 0.58, "hellaswag": 0.39}))
    _slow_decide(monkeypatch, 1.5)  # longer than the lease: another promoter may hold the lock by now
    with pytest.raises(LockLost, match="ran past its 1 s lease"):
        promote(client, NAME, v, GATE, lease_s=1.0)
    assert _champion(client) is None
    assert "tailor.promotion.record" not in client.get_model_version(NAME, v).tags
    assert _lock_tags(client) == {}


def test_the_alias_moves_only_from_the_champion_the_decision_was_made_against(registry, monkeypatch):
    # Someone outside the lock (the MLflow UI, an older tailor) moves champion while the gate judges:
    # the move is noticed just before ours and the challenger is judged again, against that champion.
    _, client, add = registry
    v = add(_tags({"arc_easy": 0.60, "hellaswag": 0.40}))
    by_hand = add(_tags({"arc_easy": 0.62, "hellaswag": 0.41}))
    real_decide, calls = promotion.decide, []

    def decide_while_someone_moves_the_alias(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 1:
            client.set_registered_model_alias(NAME, "champion", by_hand)
        return real_decide(*args, **kwargs)

    monkeypatch.setattr(promotion, "decide", decide_while_someone_moves_the_alias)
    decision = promote(client, NAME, v, GATE)
    assert calls[0] is None and calls[1] is not None  # judged first against the original, then the champion
    assert not decision.promoted and decision.previous_champion == by_hand
    assert decision.reference == f"champion v{by_hand}"
    assert _champion(client) == by_hand
    assert client.get_model_version(NAME, v).tags["tailor.promotion.reference"] == f"champion v{by_hand}"


_RACER = """
import json, sys, time
from tailor.config.settings import PromotionConfig
import tailor.registry.promotion as promotion
from tasks.promotion import promote_model

uri, name, version, work_dir, gate = sys.argv[1:6]
real_decide = promotion.decide

def slow_decide(*args, **kwargs):  # widen the window between reading the champion and moving it
    time.sleep(2.0)
    return real_decide(*args, **kwargs)

promotion.decide = slow_decide
print("ready", flush=True)
sys.stdin.readline()  # both processes call the gate together
started = time.time()
decision = promote_model.fn(uri, name, version, PromotionConfig(**json.loads(gate)))
print(json.dumps({"started": started, **decision}))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def mlflow_server(tmp_path, monkeypatch):
    """A real ``mlflow server`` on a free localhost port, its registry in its own sqlite file."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # poll it ourselves, without backoff
    port = _free_port()
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            f"sqlite:///{tmp_path / 'server.db'}",
            "--default-artifact-root",
            str(tmp_path / "server-artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                MlflowClient(uri, registry_uri=uri).search_registered_models(max_results=1)
                break
            except Exception:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("mlflow server did not start: " + (tmp_path / "server.log").read_text()[-2000:])
                time.sleep(0.5)
        yield uri
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


@pytest.mark.integration
def test_two_processes_with_their_own_work_folders_on_one_mlflow_server_move_champion_once(mlflow_server, tmp_path):
    # The case the work-folder lock and a per-run Prefect limit missed: an http tracking URI, two
    # processes that share nothing else (own work folder, own PREFECT_HOME).
    uri = mlflow_server
    client, add = _make_registry(uri, "s3://tailor-test/weights")  # a server takes no local path without a run
    a = add(_tags({"arc_easy": 0.60, "hellaswag": 0.40}, signature="limit-100"))
    b = add(_tags({"arc_easy": 0.60, "hellaswag": 0.40}, signature="limit-200"))
    racers = []
    for i, version in enumerate((a, b)):
        env = {
            **os.environ,
            "PREFECT_HOME": str(tmp_path / f"prefect-{i}"),
            "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
        }
        args = [uri, NAME, version, str(tmp_path / f"work-{i}"), GATE.model_dump_json()]
        racers.append(
            subprocess.Popen(
                [sys.executable, "-c", _RACER, *args],
                env=env,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    for racer in racers:  # both have imported MLflow and Prefect ...
        assert racer.stdout.readline().strip() == "ready", racer.stderr.read()[-2000:]
    for racer in racers:  # ... before either is let go
        racer.stdin.write("go\n")
        racer.stdin.flush()
    outputs = [r.communicate(timeout=300) for r in racers]
    assert [r.returncode for r in racers] == [0, 0], [err[-2000:] for _, err in outputs]
    decisions = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    assert abs(decisions[0]["started"] - decisions[1]["started"]) < 1.0, "the racers did not start together"
    promoted = [d for d in decisions if d["promoted"]]
    refused = [d for d in decisions if not d["promoted"]]
    assert len(promoted) == 1 and len(refused) == 1, decisions
    assert promoted[0]["previous_champion"] is None and _champion(client) == promoted[0]["version"]
    assert refused[0]["previous_champion"] == promoted[0]["version"]
    assert _lock_tags(client) == {}
    assert not any((tmp_path / f"work-{i}").exists() for i in range(2))  # nothing of the lock on disk
