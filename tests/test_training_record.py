"""The typed training progress and record: what the resume file and ``distill_record.json`` hold."""

from __future__ import annotations

import dataclasses
import json
import pickle

import pytest
import torch

from tailor.common.resources import StageCost
from tailor.distill.record import TRAINING_RECORD, TrainingProgress, TrainingRecord, training_record
from tailor.store.checkpoint import CheckpointRef
from tasks.records import Distilled

RECORD = {
    "losses": [2.5, 2.0],
    "grad_norms": [1.5, 1.25],
    "optimizer_steps": 2,
    "micro_batches": 4,
    "train_tokens": 128,
    "train_seconds": 0.5,
    "train_tokens_per_s": 256.0,
    "num_samples": 8,
    "resumed_at_step": 0,
    "world_size": 1,
    "final_learning_rate": 0.001,
    "teacher": "live (float32)",
    "gradient_checkpointing": False,
    "bf16_autocast": False,
    "trainable_parameters": 1000,
    "shared_trunk_layers": 0,
    "heldout_curve": [[0, 40.0], [2, 30.0]],
    "loss": {"objective": "hidden", "hidden_loss": "mse"},
    "linear_map": {"layer": 13, "replaced": [14, 15, 16, 17], "tokens": 5723, "explained": 0.8},
    "precision_probe": {
        "device": "cpu: Some CPU (avx512_bf16)",
        "torch_version": "2.0",
        "threads": 2,
        "supported": True,
        "gflops": {"512x640x2048": {"float32": 288.0, "bfloat16": 161.0}},
        "choice": "float32",
        "rule": "bfloat16 when its matmuls are at least 1.2x float32's GFLOP/s on every probed shape",
        "seconds": 0.5,
    },
}


def test_the_progress_survives_a_weights_only_resume_file(tmp_path):
    progress = TrainingProgress(
        epoch=1, batch=2, losses=[1.0], grad_norms=[0.5], micro=3, tokens=40, seconds=1.5, heldout_curve=[[0, 9.0]]
    )
    torch.save({"progress": progress.state_dict()}, tmp_path / "state.pt")
    loaded = torch.load(tmp_path / "state.pt", weights_only=True)["progress"]
    assert TrainingProgress.from_state_dict(loaded) == progress and loaded == dataclasses.asdict(progress)


def test_the_record_file_is_a_plain_json_object_with_the_field_names(tmp_path):
    (tmp_path / TRAINING_RECORD).write_text(json.dumps(RECORD))
    record = training_record(CheckpointRef(str(tmp_path), "f"))
    assert record.optimizer_steps == 2 and record.heldout_curve == [[0, 40.0], [2, 30.0]]
    assert list(record.to_dict().items()) == list(RECORD.items())  # same keys, same order
    assert record.summary() == {k: v for k, v in RECORD.items() if k not in ("losses", "grad_norms", "heldout_curve")}


def test_a_record_from_before_the_shared_trunk_reads_as_sharing_none():
    old = {k: v for k, v in RECORD.items() if k != "shared_trunk_layers"}
    assert TrainingRecord.from_dict(old).shared_trunk_layers == 0


def test_a_record_from_before_the_linear_map_reads_as_none_fitted():
    old = {k: v for k, v in RECORD.items() if k != "linear_map"}
    assert TrainingRecord.from_dict(old).linear_map is None


def test_a_record_from_before_the_precision_probe_reads_as_none_probed():
    old = {k: v for k, v in RECORD.items() if k != "precision_probe"}
    assert TrainingRecord.from_dict(old).precision_probe is None


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({**RECORD, "epochs": 3}, "unknown keys \\['epochs'\\]"),
        ({k: v for k, v in RECORD.items() if k != "losses"}, "missing keys \\['losses'\\]"),
    ],
)
def test_something_else_is_not_read_as_a_record(tmp_path, data, message):
    (tmp_path / TRAINING_RECORD).write_text(json.dumps(data))
    with pytest.raises(ValueError, match=message):
        training_record(CheckpointRef(str(tmp_path), "f"))


def test_the_distilled_task_result_pickles_with_its_typed_record():
    """Prefect persists task results with pickle: the cached result reads back as it was."""
    result = Distilled(CheckpointRef("/x", "f"), TrainingRecord.from_dict(RECORD), StageCost(1.0, 0.5))
    again = pickle.loads(pickle.dumps(result))
    assert again == result and isinstance(again.record, TrainingRecord)
