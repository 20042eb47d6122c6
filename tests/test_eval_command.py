"""`tailor eval` and the fast evaluator as an lm-eval model (`tailor-fast`), on tiny random models."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import yaml

from tailor.config.settings import DataConfig, EvalConfig, ModelConfig
from tailor.evaluate.harness import evaluate_model, task_specs
from tailor.models.sources import materialize

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    work = tmp_path_factory.mktemp("eval-work")
    return work, [materialize(ModelConfig(source="tiny", seed=seed), str(work)) for seed in (0, 1)]


def _tailor(*args: str) -> subprocess.CompletedProcess:
    tailor = shutil.which("tailor") or pytest.fail("the tailor command is not installed")
    return subprocess.run([tailor, *args], capture_output=True, text=True, timeout=900)


def test_tailor_eval_writes_lm_eval_files_and_pairs_with_another_evaluation(two_models, tmp_path, shared_data):
    work, (a, b) = two_models
    common = [
        "--set",
        "eval.tasks=[arc_easy,winogrande]",
        "--set",
        "eval.limit=12",
        "--set",
        f"data.data_dir={shared_data}",
        "--set",
        f"work_dir={work}",
    ]
    first = _tailor("eval", a.path, "--out", str(tmp_path / "a"), *common)
    assert first.returncode == 0, first.stderr[-3000:]
    results = list((tmp_path / "a").rglob("results_*.json"))
    assert len(results) == 1
    lm_eval_results = json.loads(results[0].read_text())["results"]
    ours = json.loads((tmp_path / "a" / "tailor-eval.json").read_text())
    assert lm_eval_results["arc_easy"]["acc,none"] == ours["metrics"]["arc_easy"]["acc"]["value"]
    samples = {p.name.split("_2")[0] for p in (tmp_path / "a").rglob("samples_*.jsonl")}
    assert samples == {"samples_arc_easy", "samples_winogrande"}

    second = _tailor("eval", b.path, "--out", str(tmp_path / "b"), "--against", str(tmp_path / "a"), *common)
    assert second.returncode == 0, second.stderr[-3000:]
    comparison = json.loads((tmp_path / "b" / "comparison.json").read_text())["tasks"]
    theirs = ours["metrics"]
    mine = json.loads((tmp_path / "b" / "tailor-eval.json").read_text())["metrics"]
    for task in ("arc_easy", "winogrande"):
        c = comparison[task]
        assert c["n"] == 12 and c["ci95"][0] <= c["delta"] <= c["ci95"][1]
        assert c["delta"] == pytest.approx(mine[task]["acc"]["value"] - theirs[task]["acc"]["value"])
        assert f"{task}: {c['delta']:+.4f}" in second.stdout


def test_bad_model_and_against_paths_fail_before_scoring(two_models, tmp_path, shared_data):
    work, (a, _) = two_models
    common = ["--set", f"data.data_dir={shared_data}", "--set", f"work_dir={work}", "--out", str(tmp_path / "o")]
    missing = _tailor("eval", a.path, "--against", str(tmp_path), *common)
    assert missing.returncode == 2 and "no lm-eval sample files" in missing.stderr
    not_a_model = _tailor("eval", str(tmp_path), *common)
    assert not_a_model.returncode == 2 and "neither an llm-tailor checkpoint" in not_a_model.stderr


def test_lm_eval_users_name_the_fast_evaluator_in_python_and_on_its_command_line(two_models, tmp_path, shared_data):
    import lm_eval

    import tailor.evaluate.fast_lm  # noqa: F401  (registers "tailor-fast")

    _, (a, _) = two_models
    data = DataConfig(data_dir=str(shared_data))
    out = lm_eval.simple_evaluate(
        model="tailor-fast",
        model_args=f"pretrained={a.path}",
        tasks=task_specs(("arc_easy",), data),
        limit=8,
        num_fewshot=0,
    )
    from tailor.store.checkpoint import load_model

    model, tokenizer = load_model(a)
    ours = evaluate_model(model, tokenizer, EvalConfig(tasks=("arc_easy",), limit=8), data)
    assert out["results"]["arc_easy"]["acc,none"] == pytest.approx(ours["metrics"]["arc_easy"]["acc"]["value"])

    # lm-eval's own command line, reading the same offline split through a task YAML.
    spec = {**task_specs(("arc_easy",), data)[0], "task": "arc_easy_offline"}
    spec.pop("tag", None)
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "arc_easy_offline.yaml").write_text(yaml.safe_dump(spec))
    cli = shutil.which("tailor-lm-eval") or pytest.fail("the tailor-lm-eval command is not installed")
    run = subprocess.run(
        [
            cli,
            "run",
            "--model",
            "tailor-fast",
            "--model_args",
            f"pretrained={a.path}",
            "--include_path",
            str(tmp_path / "tasks"),
            "--tasks",
            "arc_easy_offline",
            "--limit",
            "8",
            "--output_path",
            str(tmp_path / "cli"),
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(next((tmp_path / "cli").rglob("results_*.json")).read_text())["results"]
    assert results["arc_easy_offline"]["acc,none"] == pytest.approx(ours["metrics"]["arc_easy"]["acc"]["value"])
