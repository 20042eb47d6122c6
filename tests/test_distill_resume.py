"""Kill a real distillation process mid-run; the re-run resumes and ends with the same weights."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

WORKER = textwrap.dedent("""
    import sys
    from pathlib import Path
    import torch
    from tailor.config.settings import DistillConfig
    from tailor.data.corpus import build_samples
    from tailor.distill.trainer import Distiller
    from tailor.models.tiny import build_tiny_gemma3, build_tiny_tokenizer

    resume, out = Path(sys.argv[1]), sys.argv[2]
    tok = build_tiny_tokenizer()
    teacher = build_tiny_gemma3(tok, num_layers=4, seed=0)
    with torch.no_grad():
        teacher.model.embed_tokens.weight.mul_(20)
    student = build_tiny_gemma3(tok, num_layers=2, seed=1)
    texts = ["The capital of France is Paris. A student learns from a teacher. " * 3] * 16
    samples = build_samples(tok, texts, seq_len=24, num_samples=16, windows_per_doc=64)
    cfg = DistillConfig(learning_rate=1e-3, batch_size=2, grad_accum=2, seq_len=24, epochs=6,
                        num_samples=16, checkpoint_every=1)
    record = Distiller(teacher, student, samples, cfg,
                       on_step=lambda step, loss: print(f"step {step}", flush=True), resume_file=resume).fit()
    torch.save(student.state_dict(), out)
    print(f"resumed_at {record.resumed_at_step} steps {record.optimizer_steps}", flush=True)
""")


def _start(resume, out):
    return subprocess.Popen([sys.executable, "-c", WORKER, str(resume), str(out)], stdout=subprocess.PIPE, text=True)


@pytest.mark.integration
def test_killed_distillation_resumes_to_identical_weights(tmp_path):
    reference = _start(tmp_path / "ref.resume.pt", tmp_path / "ref.pt")
    assert reference.wait(timeout=600) == 0

    victim = _start(tmp_path / "run.resume.pt", tmp_path / "run.pt")
    for line in victim.stdout:
        if line.strip() == "step 5":
            victim.kill()
            break
    victim.wait(timeout=60)
    assert victim.returncode != 0, "the worker finished before it could be killed"
    assert (tmp_path / "run.resume.pt").exists() and not (tmp_path / "run.pt").exists()

    resumed = _start(tmp_path / "run.resume.pt", tmp_path / "run.pt")
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0
    summary = out.strip().splitlines()[-1].split()
    assert int(summary[1]) >= 5 and summary[3] == "24"

    expected, got = torch.load(tmp_path / "ref.pt"), torch.load(tmp_path / "run.pt")
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key


def test_a_resume_state_of_another_run_is_never_read(tmp_path):
    from unit_data import tiny_distillation_inputs

    from tailor.distill.trainer import distill_checkpoint, resume_path

    base, pruned, cfg, tokens = tiny_distillation_inputs(tmp_path)
    out = tmp_path / "distilled"
    other = resume_path(out, cfg.model_copy(update={"learning_rate": 5e-3}), base, pruned, tokens["train"], None, 1)
    assert other != resume_path(out, cfg, base, pruned, tokens["train"], None, 1)
    other.write_bytes(b"a state from another run: unreadable on purpose")
    ref, record = distill_checkpoint(base, pruned, cfg, tokens["train"], out, heldout=tokens["heldout"])
    assert record.resumed_at_step == 0 and record.optimizer_steps == 2 and ref.verify()
    assert other.read_bytes().startswith(b"a state from another run")
