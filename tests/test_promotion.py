"""The promotion gate against a real MLflow registry (sqlite); for races, Prefect runs sharing only the registry."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from mlflow.tracking import MlflowClient

from tailor.config.settings import ConfigError, PromotionConfig, load_config
from tailor.registry.promotion import PromotionError, decide, promote
from tailor.store.locks import LOCK_TAG_PREFIX, registry_lock

NAME = "gate-test"
GATE = PromotionConfig(min_mean_retention_pct=90, min_speedup=1.05, max_task_drop=0.05)


def _tags(acc: dict[str, float], original: dict[str, float], speedup: float, signature: str = "sig") -> dict:
    retention = sum(100 * acc[t] / original[t] for t in acc) / len(acc)
    return {
        "tailor.eval_signature": signature,
        "tailor.mean_acc_retention_pct": str(retention),
        "tailor.speedup": str(speedup),
        **{f"tailor.acc.{t}": str(v) for t, v in acc.items()},
        **{f"tailor.original_acc.{t}": str(v) for t, v in original.items()},
    }


ORIGINAL = {"arc_easy": 0.60, "hellaswag": 0.40}


@pytest.fixture()
def registry(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri, registry_uri=uri)
    client.create_registered_model(NAME)
    source = tmp_path / "weights"
    source.mkdir()

    def add(tags: dict) -> str:
        version = client.create_model_version(NAME, source=str(source), tags=tags)
        return str(version.version)

    return uri, client, add


def _champion(client) -> str | None:
    try:
        return str(client.get_model_version_by_alias(NAME, "champion").version)
    except Exception:
        return None


def test_first_champion_is_judged_against_the_original(registry):
    _, client, add = registry
    v = add(_tags({"arc_easy": 0.58, "hellaswag": 0.39}, ORIGINAL, 1.10))
    decision = promote(client, NAME, v, GATE)
    assert decision.promoted and decision.reference == "original" and decision.previous_champion is None
    assert _champion(client) == v
    tags = client.get_model_version(NAME, v).tags
    assert tags["tailor.promotion.decision"] == "promoted"
    assert "pass: mean retention" in tags["tailor.promotion.reasons"]


@pytest.mark.parametrize(
    "acc, speedup, failing",
    [
        ({"arc_easy": 0.50, "hellaswag": 0.34}, 1.10, "FAIL: mean retention"),
        ({"arc_easy": 0.60, "hellaswag": 0.40}, 1.01, "FAIL: speed-up"),
        ({"arc_easy": 0.64, "hellaswag": 0.33}, 1.10, "FAIL: hellaswag accuracy"),
    ],
)
def test_a_failing_threshold_keeps_the_alias_and_says_why(registry, acc, speedup, failing):
    _, client, add = registry
    v = add(_tags(acc, ORIGINAL, speedup))
    decision = promote(client, NAME, v, GATE)
    assert not decision.promoted and _champion(client) is None
    assert any(r.startswith(failing) for r in decision.reasons), decision.reasons
    assert client.get_model_version(NAME, v).tags["tailor.promotion.decision"] == "rejected"


def test_a_drop_equal_to_the_threshold_passes(registry):
    _, client, add = registry
    v = add(_tags({"arc_easy": 0.60, "hellaswag": 0.35}, ORIGINAL, 1.10))  # 0.40 - 0.35 > 0.05 in floats
    decision = promote(client, NAME, v, GATE)
    assert "pass: hellaswag accuracy 0.3500 vs original 0.4000: drop +0.0500 <= 0.05" in decision.reasons
    assert decision.promoted


def test_never_moves_the_champion_to_a_worse_model(registry):
    _, client, add = registry
    good = add(_tags({"arc_easy": 0.60, "hellaswag": 0.40}, ORIGINAL, 1.10))
    assert promote(client, NAME, good, GATE).promoted
    # Passes every threshold against the original, but is worse than the champion.
    worse = add(_tags({"arc_easy": 0.59, "hellaswag": 0.39}, ORIGINAL, 1.20))
    decision = promote(client, NAME, worse, GATE)
    assert not decision.promoted and decision.reference == f"champion v{good}"
    assert any(r.startswith("FAIL: mean accuracy") for r in decision.reasons)
    assert _champion(client) == good
    better = add(_tags({"arc_easy": 0.61, "hellaswag": 0.40}, ORIGINAL, 1.10))
    assert promote(client, NAME, better, GATE).promoted and _champion(client) == better


def test_a_champion_evaluated_differently_needs_force(registry):
    _, client, add = registry
    old = add(_tags({"arc_easy": 0.60, "hellaswag": 0.40}, ORIGINAL, 1.10, signature="limit-40"))
    promote(client, NAME, old, GATE)
    new = add(_tags({"arc_easy": 0.60, "hellaswag": 0.40}, ORIGINAL, 1.10, signature="full"))
    decision = promote(client, NAME, new, GATE)
    assert not decision.promoted and any("not comparable" in r for r in decision.reasons)
    forced = promote(client, NAME, new, GATE, force=True)
    assert forced.promoted and "forced by hand" in forced.reasons[-1] and _champion(client) == new


def test_a_missing_version_lists_the_existing_ones(registry):
    _, client, add = registry
    add(_tags(ORIGINAL, ORIGINAL, 1.1))
    with pytest.raises(
        PromotionError,
        match=r"version 7 of registered model 'gate-test' does not exist; "
        r"existing versions: 1",
    ):
        promote(client, NAME, "7", GATE)


def test_thresholds_outside_their_ranges_are_named():
    with pytest.raises(ConfigError, match="promotion.min_mean_retention_pct"):
        load_config("smoke", ["promotion.min_mean_retention_pct=150"])
    with pytest.raises(ConfigError, match="promotion.max_task_drop"):
        load_config("smoke", ["promotion.max_task_drop=-0.1"])
    with pytest.raises(ConfigError, match="not a name MLflow accepts"):
        load_config("smoke", ["tracking.registered_model=team/model"])


def test_decide_reads_only_tags():
    passed, reference, reasons = decide(_tags(ORIGINAL, ORIGINAL, 1.2), None, GATE)
    assert passed and reference == "original" and all(r.startswith("pass") for r in reasons)


@pytest.mark.integration
def test_two_runs_racing_to_promote_end_with_the_better_model(registry, monkeypatch, tmp_path):
    from prefect import flow
    from prefect.task_runners import ThreadPoolTaskRunner

    import tailor.registry.promotion as promotion
    from tasks.promotion import promote_model

    uri, client, add = registry
    good = add(_tags({"arc_easy": 0.60, "hellaswag": 0.40}, ORIGINAL, 1.10))
    better = add(_tags({"arc_easy": 0.62, "hellaswag": 0.41}, ORIGINAL, 1.10))
    real_decide = promotion.decide

    def slow_decide(*args, **kwargs):  # widen the window between reading the champion and moving it
        time.sleep(1.0)
        return real_decide(*args, **kwargs)

    monkeypatch.setattr(promotion, "decide", slow_decide)

    @flow(task_runner=ThreadPoolTaskRunner(max_workers=2))
    def race() -> list[dict]:
        futures = [promote_model.submit(uri, NAME, v, GATE) for v in (good, better)]
        return [f.result() for f in futures]

    decisions = race()
    assert _champion(client) == better
    # Serialised: exactly one of the two saw no champion; the other judged against it.
    assert sorted(d["previous_champion"] is None for d in decisions) == [False, True]


_RACER = """
import json, sys, time
from prefect import flow
from tailor.config.settings import PromotionConfig
import tailor.registry.promotion as promotion
from tasks.promotion import promote_model

uri, name, version, work_dir, gate = sys.argv[1:6]
real_decide = promotion.decide

def slow_decide(*args, **kwargs):  # widen the window between reading the champion and moving it
    time.sleep(2.0)
    return real_decide(*args, **kwargs)

promotion.decide = slow_decide

@flow
def promote_when_told() -> dict:
    print("ready", flush=True)  # this run's temporary Prefect server is up
    sys.stdin.readline()  # both processes call the gate together
    started = time.time()
    return {"started": started, **promote_model(uri, name, version, PromotionConfig(**json.loads(gate)))}

print(json.dumps(promote_when_told()))
"""


@pytest.mark.integration
def test_two_processes_racing_to_promote_end_with_the_better_model(registry, tmp_path):
    # Each process has its own temporary Prefect server and work folder, as two `tailor run`s do:
    # only the registry (and the lock in it) is shared between them.
    uri, client, add = registry
    good = add(_tags({"arc_easy": 0.60, "hellaswag": 0.40}, ORIGINAL, 1.10))
    better = add(_tags({"arc_easy": 0.62, "hellaswag": 0.41}, ORIGINAL, 1.10))
    racers = []
    for i, version in enumerate((better, good)):
        env = {**os.environ, "PREFECT_HOME": str(tmp_path / f"prefect-{i}")}
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
    for racer in racers:  # wait until both temporary servers are up ...
        for line in racer.stdout:
            if line.strip() == "ready":
                break
        else:
            pytest.fail(f"a racer ended before its flow started: {racer.stderr.read()[-2000:]}")
    for racer in racers:  # ... then let both go
        racer.stdin.write("go\n")
        racer.stdin.flush()
    outputs = [r.communicate(timeout=600) for r in racers]
    assert [r.returncode for r in racers] == [0, 0], [err[-2000:] for _, err in outputs]
    decisions = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    assert abs(decisions[0]["started"] - decisions[1]["started"]) < 1.0, "the racers did not start together"
    assert _champion(client) == better
    assert sorted(d["previous_champion"] is None for d in decisions) == [False, True]


def test_the_lock_lives_in_the_registry_not_in_a_work_folder_or_beside_the_store(registry, tmp_path):
    # One mechanism for every tracking URI: a tag on the registered model while held, nothing on disk.
    _, client, add = registry
    before = sorted(p.name for p in tmp_path.iterdir())
    with registry_lock(client, NAME) as lease:
        held = client.get_registered_model(NAME).tags
        assert list(held) == [lease.key] and lease.key.startswith(LOCK_TAG_PREFIX)
        assert json.loads(held[lease.key])["lease_s"] == 120.0
    assert client.get_registered_model(NAME).tags == {}
    v = add(_tags({"arc_easy": 0.58, "hellaswag": 0.39}, ORIGINAL, 1.10))
    assert promote(client, NAME, v, GATE).promoted
    assert not any(k.startswith(LOCK_TAG_PREFIX) for k in client.get_registered_model(NAME).tags)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no lock file beside mlflow.db


def test_an_unreadable_champion_stops_the_promotion_instead_of_counting_as_none(registry):
    from mlflow.exceptions import MlflowException

    uri, client, add = registry
    v = add(_tags({"arc_easy": 0.58, "hellaswag": 0.39}, ORIGINAL, 1.10))

    class FlakyRegistry(MlflowClient):
        """The real sqlite registry, except that reading an alias fails like a dropped connection."""

        def get_model_version_by_alias(self, name, alias):
            raise MlflowException("database is locked", error_code="INTERNAL_ERROR")

    with pytest.raises(PromotionError, match="cannot read alias 'champion'.*not promoting"):
        promote(FlakyRegistry(uri, registry_uri=uri), NAME, v, GATE)
    assert _champion(client) is None


@pytest.mark.parametrize(
    "interval, passes, word",
    [
        ("-0.01,-0.04,0.02,500", True, "shown within -0.05"),
        ("-0.12,-0.16,-0.08,500", False, "worse than -0.05"),
        ("-0.04,-0.10,0.02,100", False, "inconclusive"),
    ],
)
def test_against_the_original_each_task_is_judged_by_its_paired_interval(interval, passes, word):
    tags = {**_tags({"arc_easy": 0.58}, {"arc_easy": 0.60}, 1.10), "tailor.acc_delta.arc_easy": interval}
    ok, _, reasons = decide(tags, None, GATE)
    assert ok == passes
    line = next(r for r in reasons if "arc_easy" in r)
    assert word in line
    if word == "inconclusive":
        # half-width 0.06 at a distance 0.01 from the margin: 36 times the 100 documents
        assert "about 3,600 documents would decide it" in line


def test_an_undecided_stop_is_told_with_the_stop_rules_own_estimate_of_the_documents_needed():
    # A task stopped for futility at an early look: its interval is that look's (wide), and the rule's
    # estimate at the last look's boundary is what the tag carries and the gate repeats.
    interval = "-0.04,-0.127,0.047,300,8618"
    tags = {**_tags({"arc_easy": 0.58}, {"arc_easy": 0.60}, 1.10), "tailor.acc_delta.arc_easy": interval}
    ok, _, reasons = decide(tags, None, GATE)
    line = next(r for r in reasons if "arc_easy" in r)
    assert not ok and "inconclusive" in line and "about 8,618 documents would decide it" in line
