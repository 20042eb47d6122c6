import json

import pytest

from tailor.config.settings import DataConfig, EvalConfig
from tailor.evaluate.harness import EvalSetupError, check_tasks, evaluate_model


def _offline(path) -> DataConfig:
    return DataConfig(data_dir=str(path))


def test_unknown_task_lists_close_matches(unit_data):
    with pytest.raises(EvalSetupError, match="unknown lm-eval task 'arc_easyy'.*arc_easy"):
        check_tasks(("arc_easyy",), _offline(unit_data))


def test_missing_data_folder_is_named(tmp_path):
    with pytest.raises(EvalSetupError, match="data.data_dir: .*arc_easy/test.jsonl is missing"):
        check_tasks(("arc_easy",), _offline(tmp_path))


def test_missing_field_names_file_line_and_field(tmp_path):
    f = tmp_path / "benchmarks" / "winogrande" / "validation.jsonl"
    f.parent.mkdir(parents=True)
    good = {"sentence": "a _ b", "option1": "x", "option2": "y", "answer": "1"}
    f.write_text(json.dumps(good) + "\n" + json.dumps({k: v for k, v in good.items() if k != "option2"}) + "\n")
    with pytest.raises(EvalSetupError, match=r"validation.jsonl:2: missing field\(s\) \['option2'\]"):
        check_tasks(("winogrande",), _offline(tmp_path))


def test_empty_file_is_an_error_not_a_zero(tmp_path):
    f = tmp_path / "benchmarks" / "lambada_openai" / "test.jsonl"
    f.parent.mkdir(parents=True)
    f.write_text("\n")
    with pytest.raises(EvalSetupError, match="no rows"):
        check_tasks(("lambada_openai",), _offline(tmp_path))


@pytest.mark.integration
def test_offline_evaluation_of_the_four_tasks(tiny_model, tiny_tokenizer, shared_data):
    result = evaluate_model(tiny_model, tiny_tokenizer, EvalConfig(limit=4, batch_size=4), _offline(shared_data))
    m = result["metrics"]
    assert set(m) == {"arc_easy", "winogrande", "hellaswag", "lambada_openai"}
    assert set(m["arc_easy"]) == {"acc", "acc_norm"} and set(m["hellaswag"]) == {"acc", "acc_norm"}
    assert set(m["winogrande"]) == {"acc"} and set(m["lambada_openai"]) == {"acc", "perplexity"}
    for task, metrics in m.items():
        assert result["n_samples"][task] == 4
        assert len(result["items"][task]) == 4
        for metric, score in metrics.items():
            assert score["stderr"] is not None and score["stderr"] >= 0, (task, metric)
            if metric != "perplexity":
                assert 0.0 <= score["value"] <= 1.0
                items = [v[metric] for v in result["items"][task].values()]
                assert score["value"] == pytest.approx(sum(items) / len(items))
    assert m["lambada_openai"]["perplexity"]["value"] > 1.0


@pytest.mark.integration
def test_a_task_from_the_users_folder(tiny_model, tiny_tokenizer, tmp_path, shared_data):
    """Any lm-eval task works: here a user's own multiple-choice YAML over a local file."""
    rows = [
        {"q": "Is fire hot?", "options": ["yes", "no"], "gold": 0},
        {"q": "Is ice hot?", "options": ["yes", "no"], "gold": 1},
        {"q": "Is the sky green?", "options": ["yes", "no"], "gold": 1},
    ]
    data_file = tmp_path / "qa.jsonl"
    data_file.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    tasks_dir = tmp_path / "my_tasks"
    tasks_dir.mkdir()
    (tasks_dir / "my_qa.yaml").write_text(
        "task: my_qa\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: " + str(data_file) + "\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{q}} Answer:'\n"
        "doc_to_choice: '{{options}}'\ndoc_to_target: gold\nmetric_list:\n  - metric: acc\n"
    )
    cfg = EvalConfig(tasks=("my_qa", "winogrande"), limit=3, include_path=str(tasks_dir))
    result = evaluate_model(tiny_model, tiny_tokenizer, cfg, _offline(shared_data))
    assert result["n_samples"] == {"my_qa": 3, "winogrande": 3}
    assert len(result["requests"]["my_qa"]) == 3 and all(len(doc) == 2 for doc in result["requests"]["my_qa"])
    with pytest.raises(EvalSetupError, match="eval.include_path"):
        check_tasks(("my_qa",), _offline(shared_data), str(tmp_path / "nope"))


def test_the_evaluation_signature_follows_the_datas_bytes_not_its_folder(tmp_path, unit_data):
    import shutil

    from tailor.config.settings import DataConfig, EvalConfig
    from tailor.evaluate.harness import OFFLINE_SPLITS, evaluation_signature

    cfg = EvalConfig(tasks=("winogrande",), limit=5)
    copy = tmp_path / "copy"
    rel = OFFLINE_SPLITS["winogrande"][0]
    (copy / rel).parent.mkdir(parents=True)
    shutil.copyfile(unit_data / rel, copy / rel)
    same = evaluation_signature(cfg, DataConfig(data_dir=str(copy)))
    assert same == evaluation_signature(cfg, DataConfig(data_dir=str(unit_data)))
    with (copy / rel).open("a") as fh:
        fh.write('{"sentence": "A _ changed row.", "option1": "a", "option2": "b", "answer": "1"}\n')
    assert evaluation_signature(cfg, DataConfig(data_dir=str(copy))) != same
    assert evaluation_signature(
        cfg.model_copy(update={"backend": "hflm"}), DataConfig(data_dir=str(copy))
    ) != evaluation_signature(cfg, DataConfig(data_dir=str(copy)))


def test_offline_tasks_without_local_data_or_without_accuracy_fail_before_work(unit_data, tmp_path):
    from tailor.config.settings import DataConfig
    from tailor.evaluate.harness import EvalSetupError, check_tasks

    data = DataConfig(data_dir=str(unit_data))
    with pytest.raises(EvalSetupError, match="'piqa' has no offline data"):
        check_tasks(("arc_easy", "piqa"), data)
    with pytest.raises(
        EvalSetupError,
        match=r"'wikitext' reports \['bits_per_byte', 'byte_perplexity', "
        r"'word_perplexity'\], none of",
    ):
        check_tasks(("wikitext",), DataConfig(mode="hub"))
