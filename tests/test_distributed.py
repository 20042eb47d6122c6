"""Data-parallel distillation: two gloo processes under torchrun equal one process on the same global batch."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tailor.models.tiny import build_tiny_gemma3
from tailor.prune.pruning import prune_layers
from tailor.store.checkpoint import load_model, save_model, write_checkpoint

pytestmark = pytest.mark.integration

SETTINGS = [
    "distill.num_samples=16",
    "distill.seq_len=24",
    "distill.grad_accum=2",
    "distill.epochs=1",
    "distill.learning_rate=1e-3",
    "distill.checkpoint_every=0",
    # float32 matmuls: bfloat16 rounding depends on the batch shape, which differs per rank.
    "distill.teacher_dtype=float32",
]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp("ddp")
    teacher = build_tiny_gemma3(tiny_tokenizer, num_layers=4, seed=0)
    teacher_ref = write_checkpoint(root / "teacher", lambda tmp: save_model(teacher, tiny_tokenizer, tmp))
    prune_layers(teacher, [1, 2])
    student_ref = write_checkpoint(root / "student", lambda tmp: save_model(teacher, tiny_tokenizer, tmp))
    return root, teacher_ref, student_ref


def _distill(launcher: list[str], root, teacher, student, out: str, batch_size: int, shared_data) -> dict:
    """``launcher`` + the distillation's arguments: ``[python, -m, tailor.cli, distill]`` or a torchrun
    of the module each rank runs."""
    # 9 samples in global batches of 4: the last batch has one, so rank 1's share of it is empty.
    settings = [
        *SETTINGS,
        "distill.num_samples=9",
        f"distill.batch_size={batch_size}",
        f"work_dir={root}",
        f"data.data_dir={shared_data}",
    ]
    cmd = [
        *launcher,
        "--teacher",
        teacher.path,
        "--student",
        student.path,
        "--out",
        str(root / out),
        "--profile",
        "smoke",
        *[a for s in settings for a in ("--set", s)],
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_two_gloo_processes_match_one_process_with_the_same_global_batch(checkpoints, shared_data):
    """``tailor distill`` in one process against torchrun of the worker the launcher starts
    (``tailor.distill.distributed``): DistributedDataParallel, gradient accumulation (no_sync), and
    a rank whose share of the last global batch is empty."""
    root, teacher, student = checkpoints
    single = _distill([sys.executable, "-m", "tailor.cli", "distill"], root, teacher, student, "single", 4, shared_data)
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nnodes",
        "1",
        "--nproc-per-node",
        "2",
        "-m",
        "tailor.distill.distributed",
    ]
    parallel = _distill(torchrun, root, teacher, student, "parallel", 2, shared_data)
    assert single["world_size"] == 1 and parallel["world_size"] == 2
    assert parallel["optimizer_steps"] == single["optimizer_steps"] == 2
    assert parallel["train_tokens"] == single["train_tokens"]
    assert parallel["losses"][0] == pytest.approx(single["losses"][0], rel=1e-5)  # same weights, same batch
    assert parallel["losses"] == pytest.approx(single["losses"], rel=1e-3)
    # The reduced gradient itself (before clipping): a mean over ranks instead of the sum would halve it.
    assert parallel["grad_norms"] == pytest.approx(single["grad_norms"], rel=1e-3)
    ours = load_model(load_ref(parallel))[0].state_dict()
    reference = load_model(load_ref(single))[0].state_dict()
    # Two ranks sum the gradient in another order than one process. AdamW's first steps move
    # every weight by about lr * sign(gradient), so an element whose gradient is float-rounding
    # close to zero can move the other way: at most 2 * lr per step, and only for a few elements.
    steps, lr = single["optimizer_steps"], 1e-3
    differ = total = 0
    for key in reference:
        diff = (ours[key] - reference[key]).abs()
        assert float(diff.max()) <= 2 * lr * steps + 1e-6, key
        differ += int((diff > 1e-6 + 1e-4 * reference[key].abs()).sum())
        total += diff.numel()
    assert differ / total < 1e-3, f"{differ} of {total} weights differ"


def load_ref(result: dict):
    from tailor.store.checkpoint import CheckpointRef

    return CheckpointRef(result["path"], result["fingerprint"])


def test_the_flow_distils_data_parallel_like_one_process_on_the_same_global_batch(tmp_path, shared_data):
    from pathlib import Path

    from flows.tailor_flow import tailor_flow
    from tailor.config.settings import load_config
    from tailor.data.tokenised import tokenise_corpus
    from tailor.distill.trainer import distill_checkpoint
    from tailor.store.checkpoint import existing_checkpoint

    common = [f"work_dir={tmp_path}", f"data.data_dir={shared_data}", *SETTINGS]
    state = tailor_flow(
        profile="smoke",
        overrides=[*common, "distill.nproc_per_node=2", "distill.batch_size=2"],
        out_dir=str(tmp_path / "out"),
        return_state=True,
    )
    assert state.is_completed(), state.message
    report = json.loads(Path(state.result()["report_json"]).read_text())
    parallel = report["distillation"]
    assert parallel["world_size"] == 2
    # One process on the flow's own teacher and pruned student, with the same global batch.
    teacher, student = (existing_checkpoint(Path(report["checkpoints"][m]["path"])) for m in ("original", "pruned"))
    cfg = load_config("smoke", [*common, "distill.batch_size=4"])
    tokens = tokenise_corpus(teacher, cfg.distill, cfg.prune, cfg.data, cfg.work_dir)  # the flow's, found again
    _, single = distill_checkpoint(teacher, student, cfg.distill, tokens["train"], tmp_path / "single")
    assert single.world_size == 1
    assert parallel["optimizer_steps"] == single.optimizer_steps == 2
    assert parallel["train_tokens"] == single.train_tokens
    assert parallel["losses"] == pytest.approx(single.losses, rel=1e-3)
    assert parallel["grad_norms"] == pytest.approx(single.grad_norms, rel=1e-3)
