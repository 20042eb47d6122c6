"""The distillation corpus: BOS-first samples, the weighted mix, the held-out slice, early errors."""

from __future__ import annotations

import json

import pytest

from tailor.config.settings import ConfigError, DataConfig, DistillConfig, load_config
from tailor.data.corpus import CorpusError, build_samples, check_corpus, heldout_samples, source_share, training_samples


def _write(folder, name: str, texts: list[str]) -> str:
    path = folder / name
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return name


@pytest.fixture()
def corpus(tmp_path):
    stories = _write(tmp_path, "stories.jsonl", [f"story {i} once upon a time a cat sat" for i in range(20)])
    facts = _write(tmp_path, "facts.jsonl", [f"fact {i} paris is the capital of france" for i in range(10)])
    return DataConfig(data_dir=str(tmp_path)), stories, facts


def test_every_sample_starts_with_bos_even_past_a_documents_first_window(tiny_tokenizer):
    text = "a long document about many things " * 20
    samples = build_samples(tiny_tokenizer, [text], seq_len=12, num_samples=5, windows_per_doc=5)
    assert samples["input_ids"].shape == (5, 12)
    assert (samples["input_ids"][:, 0] == tiny_tokenizer.bos_token_id).all()
    # The windows continue the document: BOS, then the next 11 tokens of the text each time.
    body = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert samples["input_ids"][1, 1:].tolist() == body[11:22]


def test_one_window_per_document_by_default(tiny_tokenizer):
    samples = build_samples(tiny_tokenizer, ["one two three " * 30, "hi"], seq_len=8, num_samples=10)
    assert samples["input_ids"].shape[0] == 2
    assert samples["attention_mask"][1].sum() < 8


def test_shares_follow_the_weights_and_add_up():
    cfg = DistillConfig(corpus_mix={"a": 0.5, "b": 0.3, "c": 0.2})
    assert source_share(cfg, 10) == {"a": 5, "b": 3, "c": 2}
    shares = source_share(cfg, 7)
    assert sum(shares.values()) == 7 and shares["a"] >= shares["b"] >= shares["c"]


def test_training_samples_take_each_sources_share_and_never_a_heldout_document(corpus, tiny_tokenizer):
    data, stories, facts = corpus
    cfg = DistillConfig(corpus_mix={stories: 3, facts: 1}, num_samples=8, seq_len=32, heldout_docs=4)
    samples = training_samples(tiny_tokenizer, cfg, data)
    texts = [tiny_tokenizer.decode(row, skip_special_tokens=True) for row in samples["input_ids"]]
    assert sum(t.startswith("story") for t in texts) == 6 and sum(t.startswith("fact") for t in texts) == 2
    # The mix is interleaved: the first half of the samples already holds both sources.
    assert {t.split()[0] for t in texts[:4]} == {"story", "fact"}
    held = heldout_samples(tiny_tokenizer, cfg, data)
    held_texts = {tiny_tokenizer.decode(r, skip_special_tokens=True) for s in held.values() for r in s["input_ids"]}
    assert len(held_texts) == 8 and not held_texts & set(texts)
    assert {t.split()[1] for t in held_texts} == {"16", "17", "18", "19", "6", "7", "8", "9"}


def test_a_recipe_that_cannot_be_fed_fails_before_work_naming_the_setting(corpus):
    data, stories, facts = corpus
    with pytest.raises(CorpusError, match="distill.heldout_docs=10 leaves no training documents"):
        check_corpus(DistillConfig(corpus_mix={facts: 1}, heldout_docs=10, num_samples=1), data)
    with pytest.raises(CorpusError, match=r"distill.num_samples=40 asks stories.jsonl for 30 samples"):
        check_corpus(DistillConfig(corpus_mix={stories: 3, facts: 1}, heldout_docs=2, num_samples=40), data)
    check_corpus(
        DistillConfig(corpus_mix={stories: 3, facts: 1}, heldout_docs=2, num_samples=40, windows_per_doc=2), data
    )


def test_a_corpus_line_without_text_is_named_with_its_line(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"body": "no text"}\n')
    with pytest.raises(CorpusError, match=r"bad.jsonl:2: a corpus line needs a string field \"text\""):
        check_corpus(
            DistillConfig(corpus_mix={"bad.jsonl": 1}, heldout_docs=0, num_samples=1),
            DataConfig(data_dir=str(tmp_path)),
        )


@pytest.mark.parametrize(
    "override, needle",
    [
        ("distill.corpus_mix={}", "distill.corpus_mix must name at least one"),
        ("distill.corpus_mix={corpus/c4_sample.jsonl: 0}", "distill.corpus_mix weights must be > 0"),
        ("distill.heldout_docs=-1", "distill.heldout_docs"),
        ("distill.windows_per_doc=0", "distill.windows_per_doc"),
    ],
)
def test_bad_corpus_settings_name_the_setting(override, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config("smoke", [override])
