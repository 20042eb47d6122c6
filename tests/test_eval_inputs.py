"""`tailor eval`'s inputs, without scoring: registered versions become folders of their own, and
``--against`` names one evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tailor.config.settings import TailorError, load_config
from tailor.eval_command import read_samples, resolve_model
from tailor.models.tiny import build_tiny_gemma3
from tailor.registry import tracking
from tailor.store.checkpoint import load_model


@pytest.fixture()
def registry(monkeypatch, tiny_tokenizer) -> dict:
    """A fake registry: ``registered_version`` answers ``tag`` for version 1 of ``m``, and
    ``load_registered`` hands out a tiny model of ``seed`` (what the registry holds now)."""
    state = {"tag": None, "seed": 0, "loads": 0}
    monkeypatch.setattr(tracking, "registered_version", lambda uri, spec: ("m", "1", state["tag"]))

    def load(uri: str, name: str, version: str):
        state["loads"] += 1
        return build_tiny_gemma3(tiny_tokenizer, num_layers=2, seed=state["seed"]), tiny_tokenizer

    monkeypatch.setattr(tracking, "load_registered", load)
    return state


@pytest.mark.parametrize("tag", ["../../../../escape", "abc", "A" * 64, "0" * 63 + "/"])
def test_a_fingerprint_tag_that_is_not_a_fingerprint_is_refused_before_any_download(tmp_path, registry, tag):
    registry["tag"] = tag
    cfg = load_config("smoke", [f"work_dir={tmp_path / 'work'}"])
    with pytest.raises(TailorError, match="checkpoint_fingerprint tag .* is not a checkpoint fingerprint"):
        resolve_model("models:/m/1", cfg)
    assert registry["loads"] == 0
    assert {p.name for p in tmp_path.iterdir()} <= {"work"}  # nothing written beside the work folder


def test_a_tagged_version_is_kept_under_its_fingerprint(tmp_path, registry):
    registry["tag"] = "ab" * 32
    cfg = load_config("smoke", [f"work_dir={tmp_path}"])
    ref, name = resolve_model("models:/m/1", cfg)
    assert name == "m-v1" and Path(ref.path).name == f"registered-m-v1-{'ab' * 32}"
    assert resolve_model("models:/m/1", cfg)[0] == ref and registry["loads"] == 1


def test_untagged_versions_of_different_models_never_share_a_folder(tmp_path, registry):
    """A recreated registry numbers its versions from 1 again: the same name and number, another model."""
    cfg = load_config("smoke", [f"work_dir={tmp_path}"])
    first, _ = resolve_model("models:/m/1", cfg)
    registry["seed"] = 1
    second, _ = resolve_model("models:/m/1", cfg)
    assert second.path != first.path and second.fingerprint != first.fingerprint
    ours, theirs = (load_model(r)[0].state_dict() for r in (second, first))
    assert any(not ours[k].equal(theirs[k]) for k in ours)
    registry["seed"] = 0
    assert resolve_model("models:/m/1", cfg)[0] == first  # the same model again: its folder again
    checkpoints = Path(first.path).parent
    assert sorted(p.name for p in checkpoints.iterdir()) == sorted([Path(first.path).name, Path(second.path).name])


def _samples(folder: Path, task: str, time: str, accs: list[float]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"samples_{task}_{time}.jsonl").write_text(
        "".join(json.dumps({"doc_id": i, "acc": a}) + "\n" for i, a in enumerate(accs))
    )


def test_against_a_folder_of_one_evaluation_reads_it(tmp_path):
    _samples(tmp_path / "a" / "model-a", "arc_easy", "2025-01-01T10-00-00.000001", [1.0, 0.0])
    _samples(tmp_path / "a" / "model-a", "winogrande", "2025-01-01T10-00-00.000001", [0.0])
    assert read_samples(tmp_path / "a") == {
        "arc_easy": {"0": {"acc": 1.0}, "1": {"acc": 0.0}},
        "winogrande": {"0": {"acc": 0.0}},
    }


def test_against_a_folder_holding_two_evaluations_is_refused_naming_them(tmp_path):
    out = tmp_path / "out"
    _samples(out / "model-a", "arc_easy", "2025-01-01T10-00-00.000001", [1.0, 1.0])
    _samples(out / "model-b", "arc_easy", "2025-01-02T10-00-00.000001", [0.0, 0.0])
    with pytest.raises(TailorError, match=r"--against .* holds 2 evaluations .*model-a.*model-b"):
        read_samples(out)
    assert read_samples(out / "model-b") == {"arc_easy": {"0": {"acc": 0.0}, "1": {"acc": 0.0}}}


def test_against_a_folder_with_one_task_scored_twice_is_refused(tmp_path):
    """The same model evaluated twice into one --out: two sample files of one task, another run each."""
    out = tmp_path / "out" / "model-a"
    _samples(out, "arc_easy", "2025-01-01T10-00-00.000001", [1.0])
    _samples(out, "arc_easy", "2025-01-02T10-00-00.000001", [0.0])
    with pytest.raises(TailorError, match=r"holds 2 evaluations of arc_easy"):
        read_samples(tmp_path / "out")
