"""The corpus is tokenised in one stage; every consumer reads its set from that stage's files."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch

from tailor.config.settings import DataConfig, DistillConfig, ModelConfig, PruneConfig
from tailor.data.corpus import heldout_samples, training_samples
from tailor.data.tokenised import tokenise_corpus, tokens_in
from tailor.models.sources import materialize
from tailor.store.checkpoint import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def setup(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "c.jsonl").write_text(
        "".join(json.dumps({"text": f"document {i} about cats and dogs"}) + "\n" for i in range(14))
    )
    base = materialize(ModelConfig(source="tiny"), str(tmp_path))
    distill = DistillConfig(corpus_mix={"c.jsonl": 1}, heldout_docs=3, num_samples=8, seq_len=16)
    prune = PruneConfig(calibration_samples=4, calibration_seq_len=8)
    return base, distill, prune, DataConfig(data_dir=str(tmp_path / "data")), tmp_path / "work"


def test_the_three_sets_equal_the_corpus_functions_and_are_written_once(setup):
    base, distill, prune, data, work = setup
    sets = tokenise_corpus(base, distill, prune, data, work)
    tokenizer = load_tokenizer(base)
    for name, expected in [
        ("train", training_samples(tokenizer, distill, data)),
        ("calibration", training_samples(tokenizer, distill, data, 4, 8)),
    ]:
        got = sets[name].samples()
        assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got), name
    held, expected = sets["heldout"].per_source(), heldout_samples(tokenizer, distill, data)
    assert held.keys() == expected.keys() == {"c.jsonl"}
    assert all(torch.equal(held["c.jsonl"][k], expected["c.jsonl"][k]) for k in expected["c.jsonl"])
    stamps = {name: Path(ref.path).stat().st_mtime_ns for name, ref in sets.items()}
    again = tokenise_corpus(base, distill, prune, data, work)
    assert again == sets and {n: Path(r.path).stat().st_mtime_ns for n, r in again.items()} == stamps
    assert tokens_in(Path(sets["train"].path).parent) == sets


def test_a_calibration_change_leaves_the_training_tokens_fingerprint_alone(setup):
    """Consumers are keyed by their own set's fingerprint: the teacher cache and the distilled
    checkpoint are reused when only the calibration windows change."""
    base, distill, prune, data, work = setup
    before = tokenise_corpus(base, distill, prune, data, work)
    after = tokenise_corpus(base, distill, prune.model_copy(update={"calibration_samples": 6}), data, work)
    assert after["train"].fingerprint == before["train"].fingerprint
    assert after["heldout"].fingerprint == before["heldout"].fingerprint
    assert after["calibration"].fingerprint != before["calibration"].fingerprint


def test_an_edited_or_deleted_token_file_is_caught_and_rebuilt(setup):
    base, distill, prune, data, work = setup
    sets = tokenise_corpus(base, distill, prune, data, work)
    Path(sets["train"].path).write_bytes(Path(sets["calibration"].path).read_bytes())
    with pytest.raises(RuntimeError, match="do not match fingerprint"):
        sets["train"].samples()
    Path(sets["heldout"].path).unlink()
    with pytest.raises(FileNotFoundError, match="missing"):
        sets["heldout"].verify()
    assert tokenise_corpus(base, distill, prune, data, work)["heldout"] == sets["heldout"]


def test_only_the_tokenise_stage_reads_the_corpus_into_samples():
    """No other module of the product tokenises the corpus for itself."""
    readers = set()
    for path in [*(ROOT / "tailor").rglob("*.py"), *(ROOT / "tasks").rglob("*.py"), *(ROOT / "flows").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.ImportFrom)
                and node.module == "tailor.data.corpus"
                and {a.name for a in node.names} & {"training_samples", "heldout_samples"}
            ):
                readers.add(str(path.relative_to(ROOT)))
    assert readers == {"tailor/data/tokenised.py"}
