"""Zero-shot evaluation with EleutherAI's lm-evaluation-harness.

``hub`` mode runs lm-eval's stock tasks. ``offline`` mode runs the very same task
definitions (prompts, choices, metrics) with only the dataset source swapped for
local JSONL files in the Hugging Face schema.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import json
import math
import os
import subprocess
from pathlib import Path
from typing import Any, Callable

from tailor.common.console import third_party_prints
from tailor.config.settings import DataConfig, EvalConfig, TailorError
from tailor.store.digested import sha256_file

# Offline file and the split name the stock task reads it as.
OFFLINE_SPLITS: dict[str, tuple[str, str]] = {
    "arc_easy": ("benchmarks/arc_easy/test.jsonl", "test"),
    "hellaswag": ("benchmarks/hellaswag/validation.jsonl", "validation"),
    "winogrande": ("benchmarks/winogrande/validation.jsonl", "validation"),
    "lambada_openai": ("benchmarks/lambada_openai/test.jsonl", "test"),
}
# Fields each task's prompt functions read; checked before evaluation starts.
REQUIRED_FIELDS: dict[str, tuple[str, ...]] = {
    "arc_easy": ("question", "choices", "answerKey"),
    "hellaswag": ("activity_label", "ctx_a", "ctx_b", "endings", "label"),
    "winogrande": ("sentence", "option1", "option2", "answer"),
    "lambada_openai": ("text",),
}
REPORTED_METRICS = ("acc", "acc_norm", "perplexity")


class EvalSetupError(TailorError, ValueError):
    """The evaluation cannot start: unknown task, missing or malformed data."""


def _task_manager(include_path: str = ""):
    """lm-eval's task index, built once per process for each state of ``include_path``.

    Indexing every stock YAML takes seconds (about 8 s on a 2-core CPU), and the preflight
    checks and each evaluation of a run all need it; a user folder that gains, loses or edits
    a file gets a new index.
    """
    if include_path and not Path(include_path).is_dir():
        raise EvalSetupError(f"eval.include_path={include_path!r} is not a folder of lm-eval task YAMLs")
    files = ()
    if include_path:
        files = tuple(
            sorted(
                (str(f), f.stat().st_mtime_ns, f.stat().st_size) for f in Path(include_path).rglob("*") if f.is_file()
            )
        )
    return _indexed_tasks(str(Path(include_path).resolve()) if include_path else "", files)


@functools.lru_cache(maxsize=8)
def _indexed_tasks(include_path: str, files: tuple) -> Any:
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path or None)


def check_tasks(
    tasks: tuple[str, ...], data: DataConfig, include_path: str = "", manager=None, scored_jointly: bool = False
) -> None:
    """Fail fast on unknown task names and missing or malformed offline files.

    In offline mode the reference tasks read the offline data folder; any other task
    (stock or from ``include_path``) runs on the dataset its own YAML names. ``scored_jointly``
    (the flow's evaluation of several models in one pass): tasks that generate text are refused.
    """
    manager = manager or _task_manager(include_path)
    known = set(manager.all_tasks)
    for task in tasks:
        if task not in known:
            close = difflib.get_close_matches(task, sorted(known), n=5)
            raise EvalSetupError(
                f"eval.tasks: unknown lm-eval task {task!r}" + (f"; close matches: {', '.join(close)}" if close else "")
            )
        if data.mode == "offline" and task in OFFLINE_SPLITS:
            _check_offline_file(task, Path(data.data_dir) / OFFLINE_SPLITS[task][0])
        elif data.mode == "offline" and not _from_include_path(manager, task, include_path):
            raise EvalSetupError(
                f"eval.tasks: {task!r} has no offline data (data.mode=offline covers {', '.join(OFFLINE_SPLITS)}); "
                "give it a task YAML with local data_files in eval.include_path, or set data.mode=hub"
            )
        if scored_jointly and _output_type(manager, task) == "generate_until":
            raise EvalSetupError(
                f"eval.tasks: {task!r} generates text; the flow scores its models together on loglikelihood tasks "
                "(multiple choice, LAMBADA, perplexity): choose another task, or score it with `tailor eval`"
            )
        metrics = _reported_metrics(manager, task)
        if metrics is not None and not metrics & set(REPORTED_METRICS):
            raise EvalSetupError(
                f"eval.tasks: {task!r} reports {sorted(metrics)}, none of {list(REPORTED_METRICS)} "
                "that the report, the healing check and the gate read; choose another task"
            )


def _from_include_path(manager, task: str, include_path: str) -> bool:
    entry = manager.task_index.get(task)
    path = getattr(entry, "yaml_path", None)
    return bool(include_path and path and Path(path).resolve().is_relative_to(Path(include_path).resolve()))


def _output_type(manager, task: str) -> str | None:
    """A YAML task's ``output_type`` (None for groups and Python tasks: not checked)."""
    if getattr(manager.task_index.get(task), "yaml_path", None) is None:
        return None
    return _stock_config(manager, task).get("output_type")


def _reported_metrics(manager, task: str) -> set[str] | None:
    """The metric names a YAML task declares (None for groups and Python tasks: not checked)."""
    entry = manager.task_index.get(task)
    if getattr(entry, "yaml_path", None) is None:
        return None
    metric_list = _stock_config(manager, task).get("metric_list")
    return {m["metric"] for m in metric_list if isinstance(m.get("metric"), str)} if metric_list else None


def _check_offline_file(task: str, path: Path) -> None:
    if not path.exists():
        raise EvalSetupError(
            f"data.data_dir: {path} is missing for task {task!r}; "
            "run `tailor data pull` or point data.data_dir at an offline data folder"
        )
    rows = 0
    with path.open(encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, 1):
            if not line.strip():
                continue
            rows += 1
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise EvalSetupError(f"{path}:{line_no}: not valid JSON ({exc.msg})") from None
            missing = [f for f in REQUIRED_FIELDS[task] if f not in row]
            if missing:
                raise EvalSetupError(f"{path}:{line_no}: missing field(s) {missing} required by task {task!r}")
    if rows == 0:
        raise EvalSetupError(f"{path}: no rows; task {task!r} cannot be scored on an empty file")


def task_specs(tasks: tuple[str, ...], data: DataConfig, manager=None) -> list[Any]:
    """lm-eval task specs: names in hub mode, stock configs with a local dataset offline."""
    if data.mode == "hub":
        return list(tasks)
    manager = manager or _task_manager()
    specs = []
    for task in tasks:
        if task not in OFFLINE_SPLITS:
            specs.append(task)
            continue
        rel, split = OFFLINE_SPLITS[task]
        spec = _stock_config(manager, task)
        # Zero-shot on one local split: every other split the stock task names is absent.
        for key in ("training_split", "validation_split", "test_split", "fewshot_split"):
            if spec.get(key) != split:
                spec[key] = None
        spec.update(
            {
                "dataset_path": "json",
                "dataset_name": None,
                "dataset_kwargs": {"data_files": {split: str(Path(data.data_dir) / rel)}},
            }
        )
        specs.append(spec)
    return specs


def _stock_config(manager, task: str) -> dict[str, Any]:
    """The stock task's full YAML config, with its !function references resolved."""
    from lm_eval.tasks._yaml_loader import load_yaml

    entry = manager.task_index[task]
    if entry.yaml_path is None:
        raise EvalSetupError(f"eval.tasks: {task!r} is a Python task; offline mode needs a YAML task")
    return dict(load_yaml(entry.yaml_path, resolve_func=True))


def evaluation_signature(cfg: EvalConfig, data: DataConfig) -> str:
    """What a model's scores depend on besides its weights: the tasks and how they are scored,
    the bytes of the offline data and of ``include_path``'s task files, and lm-eval's version.
    Two evaluations with the same signature are comparable document by document."""
    h = hashlib.sha256(
        json.dumps([list(cfg.tasks), cfg.limit, cfg.backend, cfg.dtype, data.mode, _lm_eval_version()]).encode()
    )
    files = [
        Path(data.data_dir) / OFFLINE_SPLITS[t][0] for t in cfg.tasks if data.mode == "offline" and t in OFFLINE_SPLITS
    ]
    if cfg.include_path:
        files += sorted(p for p in Path(cfg.include_path).rglob("*") if p.is_file())
        files += task_data_files(Path(cfg.include_path))
    for f in files:
        h.update(f.name.encode())
        h.update(hashlib.sha256(f.read_bytes()).digest() if f.exists() else b"missing")
    return h.hexdigest()[:16]


def task_data_files(include_path: Path) -> list[Path]:
    """Local files the task YAMLs under ``include_path`` read their documents from, wherever
    they lie: ``dataset_kwargs.data_files`` and a ``dataset_path`` that is a local file or
    folder, relative to the YAML's folder or else to the working directory (as ``datasets``
    resolves them). Hub datasets are named, not read, here."""
    import yaml

    class _Loader(yaml.SafeLoader):
        pass

    # lm-eval's YAMLs carry tags such as ``!function utils.process_docs``: not data files.
    _Loader.add_multi_constructor("!", lambda loader, suffix, node: None)
    found: set[Path] = set()
    for spec in sorted(include_path.rglob("*.y*ml")):
        try:
            doc = yaml.load(spec.read_text(encoding="utf-8"), Loader=_Loader)
        except (yaml.YAMLError, UnicodeDecodeError):
            continue
        if not isinstance(doc, dict):
            continue
        kwargs = doc.get("dataset_kwargs") if isinstance(doc.get("dataset_kwargs"), dict) else {}
        named = [doc.get("dataset_path"), *_strings(kwargs.get("data_files")), kwargs.get("data_dir")]
        for name in (n for n in named if isinstance(n, str) and n):
            for base in (spec.parent, Path.cwd()):
                path = (base / name).expanduser()
                if path.is_file():
                    found.add(path.resolve())
                    break
                if path.is_dir():
                    found.update(p.resolve() for p in path.rglob("*") if p.is_file())
                    break
    inside = include_path.resolve()
    return sorted(p for p in found if not p.is_relative_to(inside))  # those inside are hashed already


def _strings(value) -> list[str]:
    """The file names of a ``data_files`` value: a name, a list of names, or a dict of either."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, (list, tuple)):
        return [s for v in value for s in _strings(v)]
    return []


def evaluation_datasets(cfg: EvalConfig, data: DataConfig) -> list[dict[str, str]]:
    """Each task's data as a dataset input for tracking: {"name", "digest", "source", "context"};
    the digest is the offline file's sha256 (hub tasks: of the task name and limit only)."""
    out = []
    for task in cfg.tasks:
        path = Path(data.data_dir) / OFFLINE_SPLITS[task][0] if task in OFFLINE_SPLITS else None
        if data.mode == "offline" and path is not None and path.exists():
            digest, source = sha256_file(path), str(path)
        else:
            digest, source = hashlib.sha256(json.dumps([task, cfg.limit]).encode()).hexdigest(), f"lm-eval task {task}"
        out.append({"name": task, "digest": digest, "source": source, "context": "evaluation"})
    return out


@functools.cache
def _git_hash_quietly() -> str | None:
    """What lm-eval records as ``git_hash`` (``git describe`` of the working directory),
    without git's "fatal: not a git repository" on the terminal outside a repository; once per process."""
    try:
        return subprocess.check_output(["git", "describe", "--always"], stderr=subprocess.DEVNULL).strip().decode()
    except (subprocess.CalledProcessError, FileNotFoundError):
        return None


_ENV_INFO: dict = {}


def _env_info_once(storage: dict) -> None:
    """lm-eval's ``add_env_info``, computed once per process: torch's environment report runs
    subprocesses for seconds, and a sequential evaluation calls lm-eval a dozen times or more."""
    from lm_eval.loggers.utils import add_env_info

    if not _ENV_INFO:
        add_env_info(_ENV_INFO)
    storage.update(_ENV_INFO)


def evaluate_model(
    model,
    tokenizer,
    cfg: EvalConfig,
    data: DataConfig,
    on_progress: Callable[[int, int], None] | None = None,
    lm_eval_dir: Path | None = None,
    model_name: str = "",
) -> dict:
    """Score ``model`` on ``cfg.tasks`` with lm-eval; returns {"metrics", "items", ...}.

    ``lm_eval_dir``: also write lm-eval's own files there (results JSON and per-sample
    JSONL, as ``lm_eval --output_path --log_samples`` does), under ``model_name``.
    """
    from lm_eval.models.huggingface import HFLM

    from tailor.evaluate.fast_lm import FastHFLM

    manager = _task_manager(cfg.include_path)
    check_tasks(cfg.tasks, data, cfg.include_path, manager)
    lm_class = FastHFLM if cfg.backend == "fast" else HFLM
    lm = lm_class(pretrained=model, tokenizer=tokenizer, batch_size=cfg.batch_size)
    if isinstance(lm, FastHFLM):
        lm.share_context = cfg.share_context
        lm.on_progress = on_progress
    tracker = None
    if lm_eval_dir is not None:
        from lm_eval.loggers import EvaluationTracker

        tracker = EvaluationTracker(output_path=str(lm_eval_dir))
    out = run_lm_eval(lm, task_specs(cfg.tasks, data, manager), manager, cfg, cfg.limit, tracker)
    if tracker is not None:
        tracker.general_config_tracker.model_name = model_name
        tracker.general_config_tracker.model_name_sanitized = folder_name(model_name)
        samples = out.pop("samples")
        tracker.save_results_aggregated(results=out, samples=samples)
        for task in cfg.tasks:
            tracker.save_results_samples(task_name=task, samples=samples[task])
        out["samples"] = samples
    return summarise(out, cfg.tasks, cfg, data)


def run_lm_eval(lm, tasks: list, manager, cfg: EvalConfig, limit: int | None, tracker=None) -> dict:
    """``lm_eval.simple_evaluate`` zero-shot with per-sample logs, seeded, bootstrapped in-process."""
    import lm_eval
    import lm_eval.evaluator

    lm_eval.evaluator.get_git_commit_hash = _git_hash_quietly
    lm_eval.evaluator.add_env_info = _env_info_once
    # lm-eval's bootstrap forks a process pool; forking a threaded process (a Prefect
    # task runner) can deadlock, so bootstrap in-process.
    os.environ["DISABLE_MULTIPROC"] = "1"
    with third_party_prints():
        return lm_eval.simple_evaluate(
            model=lm,
            tasks=tasks,
            task_manager=manager,
            num_fewshot=0,
            limit=limit,
            log_samples=True,
            bootstrap_iters=cfg.bootstrap_iters,
            random_seed=0,
            numpy_random_seed=0,
            torch_random_seed=0,
            fewshot_random_seed=0,
            evaluation_tracker=tracker,
        )


def summarise(out: dict, tasks: tuple[str, ...] | list[str], cfg: EvalConfig, data: DataConfig) -> dict:
    """What the product keeps of lm-eval's output for ``tasks``: metrics, per-document scores and answers."""
    return {
        "metrics": {task: _task_metrics(out["results"][task]) for task in tasks},
        "items": {task: _item_scores(out["samples"][task]) for task in tasks},
        "n_samples": {task: len(out["samples"][task]) for task in tasks},
        "requests": {task: [_responses(s) for s in out["samples"][task]] for task in tasks},
        "limit": cfg.limit,
        "backend": cfg.backend,
        "dtype": cfg.dtype,
        "data_mode": data.mode,
        "lm_eval_version": _lm_eval_version(),
    }


def folder_name(name: str) -> str:
    """A model name as a folder name: path separators and odd characters replaced."""
    return "".join(c if c.isalnum() or c in "-._" else "__" for c in name) or "model"


def _task_metrics(raw: dict) -> dict[str, dict]:
    """{metric: {"value", "stderr"}} for the metrics we report."""
    scores = {}
    for metric in REPORTED_METRICS:
        key = f"{metric},none"
        if key in raw:
            err = raw.get(f"{metric}_stderr,none")
            scores[metric] = {
                "value": float(raw[key]),
                "stderr": float(err) if isinstance(err, (int, float)) and math.isfinite(err) else None,
            }
    return scores


def _item_scores(samples: list[dict]) -> dict[str, dict[str, float]]:
    """Per-document scores keyed by doc_id, for paired comparisons between models."""
    items = {}
    for s in samples:
        items[str(s["doc_id"])] = {m: float(s[m]) for m in ("acc", "acc_norm") if m in s}
    return items


def _responses(sample: dict) -> list[list]:
    """The raw (loglikelihood, is_greedy) answer of each request of one document."""
    return [
        [float(r[0][0]), bool(r[0][1])] if isinstance(r[0], (list, tuple)) else [float(r[0]), None]
        for r in sample["resps"]
    ]


def _lm_eval_version() -> str:
    from importlib.metadata import version

    return version("lm_eval")
