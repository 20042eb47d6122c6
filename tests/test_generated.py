"""The teacher's own text as a corpus source: sampled once, keyed by what it depends on, resumed when killed."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from tailor.config.settings import TEACHER_SOURCE, DataConfig, DistillConfig, GenerateConfig, ModelConfig
from tailor.data.corpus import training_samples
from tailor.distill import generated
from tailor.distill.generated import generate_corpus
from tailor.models.sources import materialize
from tailor.store.checkpoint import load_tokenizer


@pytest.fixture()
def teacher(tmp_path):
    return materialize(ModelConfig(source="tiny"), str(tmp_path / "work"))


def test_sequences_start_with_bos_are_seeded_and_masked_through_their_end(teacher, tmp_path):
    cfg = GenerateConfig(batch_size=3, seed=5, temperature=1.0, top_p=0.9)
    ref = generate_corpus(teacher, cfg, count=7, seq_len=12, root=tmp_path / "text")
    tokens = load_file(ref.path)
    ids, mask = tokens["input_ids"], tokens["attention_mask"]
    tokenizer = load_tokenizer(teacher)
    assert ids.shape == mask.shape == (7, 12)
    assert torch.all(ids[:, 0] == tokenizer.bos_token_id)
    # Real tokens first, then padding only; an end token, if any, is the last real one.
    lengths = mask.sum(1)
    assert torch.equal(mask, (torch.arange(12)[None] < lengths[:, None]).long())
    for row, n in zip(ids, lengths):
        assert tokenizer.eos_token_id not in row[1 : n - 1].tolist()
        assert torch.all(row[n:] == tokenizer.pad_token_id)
    # Another seed writes other text into another folder; the same settings find the file.
    other = generate_corpus(teacher, cfg.model_copy(update={"seed": 6}), 7, 12, tmp_path / "text")
    assert other.path != ref.path and other.fingerprint != ref.fingerprint
    assert generate_corpus(teacher, cfg, 7, 12, tmp_path / "text") == ref


def test_a_killed_generation_resumes_to_the_uninterrupted_text(teacher, tmp_path, monkeypatch):
    cfg = GenerateConfig(batch_size=2, seed=1)
    whole = generate_corpus(teacher, cfg, count=5, seq_len=10, root=tmp_path / "whole")

    calls = []
    real = generated.sample_batch

    def dies_on_the_second_batch(*args, **kwargs):
        calls.append(kwargs["seed"])
        if len(calls) == 2:
            raise KeyboardInterrupt  # the process killed mid-stage
        return real(*args, **kwargs)

    monkeypatch.setattr(generated, "sample_batch", dies_on_the_second_batch)
    with pytest.raises(KeyboardInterrupt):
        generate_corpus(teacher, cfg, count=5, seq_len=10, root=tmp_path / "killed")
    monkeypatch.setattr(generated, "sample_batch", real)
    calls.clear()
    monkeypatch.setattr(generated, "sample_batch", lambda *a, **k: (calls.append(k["seed"]), real(*a, **k))[1])
    resumed = generate_corpus(teacher, cfg, count=5, seq_len=10, root=tmp_path / "killed")
    assert calls == [2, 3]  # the first batch came from its shard
    assert resumed.fingerprint == whole.fingerprint
    assert not list((tmp_path / "killed").rglob("shard-*"))  # no partial files left beside the set


def test_the_teacher_source_mixes_with_corpus_files_by_weight(teacher, tmp_path):
    corpus = tmp_path / "data" / "corpus"
    corpus.mkdir(parents=True)
    (corpus / "mine.jsonl").write_text(
        "\n".join('{"text": "a small story about a cat number %d"}' % i for i in range(12))
    )
    text = generate_corpus(teacher, GenerateConfig(batch_size=4), count=4, seq_len=16, root=tmp_path / "text")
    cfg = DistillConfig(
        corpus_mix={"corpus/mine.jsonl": 1, TEACHER_SOURCE: 1}, num_samples=8, seq_len=16, heldout_docs=2
    )
    tokenizer = load_tokenizer(teacher)
    samples = training_samples(
        tokenizer, cfg, DataConfig(data_dir=str(tmp_path / "data")), teacher_text=load_file(text.path)
    )
    generated_rows = {
        tuple(r[m.bool()].tolist()) for r, m in zip(*(load_file(text.path)[k] for k in ("input_ids", "attention_mask")))
    }
    rows = [tuple(r[m.bool()].tolist()) for r, m in zip(samples["input_ids"], samples["attention_mask"])]
    assert len(rows) == 8 and sum(r in generated_rows for r in rows) == 4
