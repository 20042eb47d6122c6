"""`tailor data pull --from hub` writes the offline schema: its conversions, on real rows of the offline data."""

import pytest

from tailor.data import offline

# They read the real offline rows (a pull, where no shared data folder is beside the checkout).
pytestmark = pytest.mark.integration


def _as_hub_dataset(rows: list[dict]):
    """The real rows as the hub hands them over: a datasets.Dataset (Arrow types and all)."""
    import datasets

    return datasets.Dataset.from_list(rows)


@pytest.mark.parametrize("task", list(offline.BENCHMARK_FILES))
def test_hub_conversion_of_real_rows_reproduces_the_offline_file(task, shared_data):
    reference = offline.read_jsonl(shared_data / offline.BENCHMARK_FILES[task])[:200]
    hub = _as_hub_dataset(reference)
    converted = list(offline.benchmark_rows(task, hub, "hub"))
    assert converted == reference
    assert [list(r) for r in converted] == [list(r) for r in reference]  # field order too


def _hub_features(task: str):
    """The features each hub dataset declares (its dataset card), extra columns included."""
    from datasets import Features, Sequence, Value

    s = Value("string")
    return Features(
        {
            "arc_easy": {"id": s, "question": s, "choices": Sequence({"text": s, "label": s}), "answerKey": s},
            "hellaswag": {
                "ind": Value("int32"),
                "activity_label": s,
                "ctx_a": s,
                "ctx_b": s,
                "ctx": s,
                "endings": Sequence(s),
                "source_id": s,
                "split": s,
                "split_type": s,
                "label": s,
            },
            "winogrande": {"sentence": s, "option1": s, "option2": s, "answer": s},
            "lambada_openai": {"text": s, "domain": s},
        }[task]
    )


@pytest.mark.parametrize("task", list(offline.BENCHMARK_FILES))
def test_rows_typed_as_the_hub_declares_them_convert_to_the_offline_file(task, shared_data):
    import datasets

    reference = offline.read_jsonl(shared_data / offline.BENCHMARK_FILES[task])[:50]
    features = _hub_features(task)
    # Hub column order, plus the columns the hub has and the offline file does not.
    rows = [{name: row.get(name, "hub-only") for name in features} for row in reference]
    hub = datasets.Dataset.from_list(rows, features=features)
    assert list(offline.benchmark_rows(task, hub, "hub")) == reference


def test_hub_conversion_drops_extra_columns_and_names_a_missing_field(shared_data):
    rows = offline.read_jsonl(shared_data / offline.BENCHMARK_FILES["winogrande"])[:3]
    with_extra = [{**r, "hub_only": 1} for r in rows]
    assert list(offline.benchmark_rows("winogrande", with_extra, "hub")) == rows
    broken = [rows[0], {k: v for k, v in rows[1].items() if k != "option2"}]
    with pytest.raises(ValueError, match=r"hub row 1: field 'option2' is missing"):
        list(offline.benchmark_rows("winogrande", broken, "hub"))


def test_hub_conversion_turns_integer_labels_into_the_offline_strings(shared_data):
    row = offline.read_jsonl(shared_data / offline.BENCHMARK_FILES["hellaswag"])[0]
    assert offline.offline_benchmark_row("hellaswag", {**row, "label": int(row["label"])}, "x") == row


@pytest.mark.parametrize("rel", offline.CORPUS_FILES)
def test_corpus_conversion_of_real_documents(rel, shared_data):
    reference = offline.read_jsonl(shared_data / rel)[:50]
    assert list(offline.corpus_rows(rel, _as_hub_dataset(reference), "hub", n=20)) == reference[:20]


def test_wikipedia_documents_keep_their_title_as_first_line(shared_data):
    first = offline.read_jsonl(shared_data / offline.CORPUS_FILES[1])[0]["text"]
    title, body = first.split("\n\n", 1)
    row = {"id": "1", "url": "u", "title": title, "text": body}
    assert offline.corpus_document(offline.CORPUS_FILES[1], row, "hub") == {"text": first}
