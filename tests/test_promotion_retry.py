"""A promotion is one decision that a retry cannot misreport.

The decision is written on the version before the alias moves, and a call that finds its own
decision recorded completes and reports that one. Faults are injected on our side (a registry
write that fails once, or fails after the server applied it) against a real sqlite registry.
"""

from __future__ import annotations

import json

import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from tailor.config.settings import PromotionConfig
from tailor.registry.promotion import decide, promote

NAME = "retry-test"
GATE = PromotionConfig(min_mean_retention_pct=90, min_speedup=1.05, max_task_drop=0.05)
ORIGINAL = {"arc_easy": 0.60, "hellaswag": 0.40}


def _tags(acc: dict[str, float], speedup: float = 1.10) -> dict:
    retention = sum(100 * acc[t] / ORIGINAL[t] for t in acc) / len(acc)
    return {
        "tailor.eval_signature": "sig",
        "tailor.mean_acc_retention_pct": str(retention),
        "tailor.speedup": str(speedup),
        **{f"tailor.acc.{t}": str(v) for t, v in acc.items()},
        **{f"tailor.original_acc.{t}": str(v) for t, v in ORIGINAL.items()},
    }


GOOD = _tags({"arc_easy": 0.58, "hellaswag": 0.39})


@pytest.fixture()
def registry(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri, registry_uri=uri)
    client.create_registered_model(NAME)
    (tmp_path / "weights").mkdir()

    def add(tags: dict) -> str:
        return str(client.create_model_version(NAME, source=str(tmp_path / "weights"), tags=tags).version)

    return uri, client, add


def _champion(client) -> str | None:
    try:
        return str(client.get_model_version_by_alias(NAME, "champion").version)
    except MlflowException:
        return None


class _FailOnce:
    """Wraps one client method: the first call whose arguments match fails like a dropped connection,
    before the registry applies it (``after=False``) or after (``after=True``)."""

    def __init__(self, real, match, after: bool = False):
        self.real, self.match, self.after, self.failed = real, match, after, 0

    def __call__(self, *args, **kwargs):
        if self.failed or not self.match(*args):
            return self.real(*args, **kwargs)
        self.failed += 1
        if self.after:
            self.real(*args, **kwargs)
        raise MlflowException("connection reset by peer", error_code="INTERNAL_ERROR")


def _expected_first_promotion() -> tuple[bool, str, list[str]]:
    return decide(GOOD, None, GATE)


def test_a_tag_write_failing_after_the_decision_is_retried_as_the_same_decision(registry, monkeypatch):
    _, client, add = registry
    v = add(GOOD)
    failing = _FailOnce(client.set_model_version_tag, lambda name, version, key, value: key.endswith(".reasons"))
    monkeypatch.setattr(client, "set_model_version_tag", failing)
    with pytest.raises(MlflowException, match="connection reset"):
        promote(client, NAME, v, GATE)
    assert failing.failed == 1
    retried = promote(client, NAME, v, GATE)  # what the task's retry does
    passed, reference, reasons = _expected_first_promotion()
    assert passed and retried.promoted, retried.reasons
    assert retried.reasons == reasons and retried.reference == reference == "original"
    assert retried.previous_champion is None
    assert _champion(client) == v
    tags = client.get_model_version(NAME, v).tags
    assert tags["tailor.promotion.decision"] == "promoted"
    assert tags["tailor.promotion.reasons"] == "; ".join(reasons)
    assert tags["tailor.promotion.time"] == retried.time


def test_an_alias_move_applied_but_reported_failed_is_retried_as_the_same_decision(registry, monkeypatch):
    _, client, add = registry
    v = add(GOOD)
    failing = _FailOnce(client.set_registered_model_alias, lambda *args: True, after=True)
    monkeypatch.setattr(client, "set_registered_model_alias", failing)
    with pytest.raises(MlflowException, match="connection reset"):
        promote(client, NAME, v, GATE)
    assert _champion(client) == v  # the server did move it
    first_time = client.get_model_version(NAME, v).tags["tailor.promotion.time"]
    retried = promote(client, NAME, v, GATE)
    assert retried.promoted and retried.previous_champion is None, retried
    assert retried.reasons == _expected_first_promotion()[2]
    assert not any("already" in r for r in retried.reasons)
    assert retried.time == first_time
    assert client.get_model_version(NAME, v).tags["tailor.promotion.decision"] == "promoted"


def test_a_rejection_retried_is_the_same_rejection_with_its_first_time(registry, monkeypatch):
    _, client, add = registry
    v = add(_tags({"arc_easy": 0.60, "hellaswag": 0.40}, speedup=1.01))
    failing = _FailOnce(client.set_model_version_tag, lambda name, version, key, value: key.endswith(".time"))
    monkeypatch.setattr(client, "set_model_version_tag", failing)
    with pytest.raises(MlflowException):
        promote(client, NAME, v, GATE)
    tags = client.get_model_version(NAME, v).tags
    assert tags["tailor.promotion.decision"] == "rejected" and "tailor.promotion.time" not in tags
    retried = promote(client, NAME, v, GATE)
    assert not retried.promoted and any(r.startswith("FAIL: speed-up") for r in retried.reasons)
    assert retried.time == json.loads(tags["tailor.promotion.record"])["time"]
    assert client.get_model_version(NAME, v).tags["tailor.promotion.time"] == retried.time
    assert _champion(client) is None


def test_a_retry_after_the_champion_moved_is_judged_again(registry, monkeypatch):
    # The recorded decision was made against a champion that is no longer there: it is not reused.
    _, client, add = registry
    v = add(GOOD)
    failing = _FailOnce(client.set_model_version_tag, lambda name, version, key, value: key.endswith(".reasons"))
    monkeypatch.setattr(client, "set_model_version_tag", failing)
    with pytest.raises(MlflowException):
        promote(client, NAME, v, GATE)
    better = add(_tags({"arc_easy": 0.62, "hellaswag": 0.41}))
    assert promote(client, NAME, better, GATE).promoted  # between the attempts, another promotion won
    retried = promote(client, NAME, v, GATE)
    assert not retried.promoted and retried.previous_champion == better
    assert retried.reference == f"champion v{better}" and _champion(client) == better


def test_a_champion_set_by_hand_is_reported_as_such_and_its_record_left_alone(registry):
    _, client, add = registry
    v = add(GOOD)
    client.set_registered_model_alias(NAME, "champion", v)  # outside the gate
    decision = promote(client, NAME, v, GATE)
    assert not decision.promoted and decision.reasons == ["already champion"] and decision.previous_champion == v
    assert not any(k.startswith("tailor.promotion.") for k in client.get_model_version(NAME, v).tags)


def test_forcing_after_a_rejection_is_a_new_decision(registry):
    _, client, add = registry
    v = add(_tags({"arc_easy": 0.60, "hellaswag": 0.40}, speedup=1.01))
    assert not promote(client, NAME, v, GATE).promoted
    forced = promote(client, NAME, v, GATE, force=True)
    assert forced.promoted and forced.reasons[-1] == "forced by hand: thresholds overridden"
    assert _champion(client) == v


@pytest.mark.integration
def test_the_prefect_task_retrying_a_failed_tag_write_reports_the_promotion(registry, monkeypatch, tmp_path):
    from prefect import flow

    from tasks.promotion import promote_model

    uri, client, add = registry
    v = add(GOOD)
    failing = _FailOnce(
        MlflowClient.set_model_version_tag, lambda self, name, version, key, value: key.endswith(".decision")
    )
    monkeypatch.setattr(MlflowClient, "set_model_version_tag", lambda self, *a: failing(self, *a))

    @flow
    def promote_with_quick_retries() -> dict:
        return promote_model.with_options(retry_delay_seconds=0)(uri, NAME, v, GATE)

    decision = promote_with_quick_retries()
    assert failing.failed == 1
    assert decision["promoted"] and decision["previous_champion"] is None, decision
    assert _champion(client) == v
