"""FastHFLM gives lm-eval's HFLM numbers: same per-request log-likelihoods, greedy flags, metrics."""

from __future__ import annotations

import pytest
import torch
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM

from tailor.config.settings import DataConfig, EvalConfig
from tailor.evaluate.fast_lm import FastHFLM, _batches, _pack, _Segment
from tailor.evaluate.harness import evaluate_model


def assert_same_evaluation(ours: dict, theirs: dict, tol: float = 1e-4) -> float:
    """Every request's (loglikelihood, greedy) and every metric agree; returns the max |Δ loglik|."""
    worst = 0.0
    for task in theirs["requests"]:
        assert len(ours["requests"][task]) == len(theirs["requests"][task])
        for doc_ours, doc_theirs in zip(ours["requests"][task], theirs["requests"][task]):
            for (ll_a, greedy_a), (ll_b, greedy_b) in zip(doc_ours, doc_theirs, strict=True):
                worst = max(worst, abs(ll_a - ll_b))
                assert greedy_a == greedy_b, task
        for metric, score in theirs["metrics"][task].items():
            assert ours["metrics"][task][metric]["value"] == pytest.approx(score["value"], rel=1e-4), (task, metric)
    assert worst <= tol
    return worst


@pytest.mark.integration
def test_parity_on_the_four_reference_tasks(tiny_model, tiny_tokenizer, shared_data):
    data = DataConfig(data_dir=str(shared_data))
    ours = evaluate_model(tiny_model, tiny_tokenizer, EvalConfig(limit=6, batch_size=5, backend="fast"), data)
    theirs = evaluate_model(tiny_model, tiny_tokenizer, EvalConfig(limit=6, batch_size=1, backend="hflm"), data)
    assert_same_evaluation(ours, theirs)
    # lambada exercises the greedy check and the perplexity aggregation.
    assert "perplexity" in ours["metrics"]["lambada_openai"]


def _requests(kind: str, args_list):
    return [Instance(kind, {}, args, i) for i, args in enumerate(args_list)]


def test_loglikelihood_greedy_and_rolling_requests(tiny_model, tiny_tokenizer):
    fast = FastHFLM(pretrained=tiny_model, tokenizer=tiny_tokenizer, batch_size=3)
    ref = HFLM(pretrained=tiny_model, tokenizer=tiny_tokenizer, batch_size=1)
    pairs = [
        ("The capital of", " France"),
        ("A student learns from", " a teacher and more"),
        ("Hello", " world"),
        ("The quick brown fox " * 30, " ok"),
        ("the the the the", " the"),
    ]
    a = fast.loglikelihood(_requests("loglikelihood", pairs), disable_tqdm=True)
    b = ref.loglikelihood(_requests("loglikelihood", pairs), disable_tqdm=True)
    for (ll_a, g_a), (ll_b, g_b) in zip(a, b):
        assert ll_a == pytest.approx(ll_b, abs=1e-4) and g_a == g_b
    texts = [("A student learns from a teacher. " * 5,), ("short text",)]
    rolling_a = fast.loglikelihood_rolling(_requests("loglikelihood_rolling", texts), disable_tqdm=True)
    rolling_b = ref.loglikelihood_rolling(_requests("loglikelihood_rolling", texts), disable_tqdm=True)
    assert rolling_a == pytest.approx(rolling_b, abs=1e-4)


def test_scoring_in_small_output_head_chunks_changes_nothing(tiny_model, tiny_tokenizer):
    pairs = [
        ("The capital of", " France is Paris"),
        ("A student learns from", " a teacher and more"),
        ("Hello", " world"),
        ("The quick brown fox " * 30, " jumps over the lazy dog"),
    ]
    answers = {}
    for chunk in (1, 3, 10_000):  # a chunk boundary inside one request's continuation, and none at all
        fast = FastHFLM(pretrained=tiny_model, tokenizer=tiny_tokenizer, batch_size=4)
        fast.score_chunk_tokens = chunk
        answers[chunk] = fast.loglikelihood(_requests("loglikelihood", pairs), disable_tqdm=True)
    # Equal up to float rounding (a one-row matmul may sum in another order than a many-row one).
    for chunk in (1, 3):
        assert [g for _, g in answers[chunk]] == [g for _, g in answers[10_000]]
        assert [ll for ll, _ in answers[chunk]] == pytest.approx([ll for ll, _ in answers[10_000]], abs=1e-4)


def test_a_greedy_continuation_is_flagged(tiny_model, tiny_tokenizer):
    fast = FastHFLM(pretrained=tiny_model, tokenizer=tiny_tokenizer, batch_size=2)
    context = tiny_tokenizer("The capital of")["input_ids"]
    out = tiny_model.generate(input_ids=torch.tensor([context]), max_new_tokens=3, do_sample=False)[0].tolist()
    greedy = out[len(context) :]
    other = [(greedy[0] + 1) % len(tiny_tokenizer)] + greedy[1:]
    (ll_g, is_g), (ll_o, is_o) = fast._loglikelihood_tokens(
        [(None, context, greedy), (None, context, other)], disable_tqdm=True
    )
    assert is_g and not is_o
    assert ll_g > ll_o


@pytest.mark.parametrize("share_context", [True, False])
def test_shared_prefixes_packed_match_separate_forwards(tiny_model, tiny_tokenizer, share_context):
    fast = FastHFLM(pretrained=tiny_model, tokenizer=tiny_tokenizer, batch_size=2)
    fast.share_context, fast.pack_tokens = share_context, 48
    ref = HFLM(pretrained=tiny_model, tokenizer=tiny_tokenizer, batch_size=1)
    # One question with three choices (one single-token) and a context longer than the tiny
    # model's sliding window of 16 tokens; a WinoGrande-like pair that shares only the start
    # of the sentence; a lone request; rows of 48 tokens so several segments share a row.
    long_ctx = "Question: which animal is the largest mammal that lives in the sea today? Answer:"
    pairs = [
        (long_ctx, " a whale"),
        (long_ctx, " a very small brown dog"),
        (long_ctx, " x"),
        ("The trophy did not fit in the suitcase because the trophy", " was too big."),
        ("The trophy did not fit in the suitcase because the suitcase", " was too big."),
        ("Alone here", " yes"),
    ]
    segments = fast._segments([(None, *fast._encode_pair(c, x)) for c, x in pairs])
    members = [[i for i, _, _ in s.scored] for s in segments]
    assert members == ([[0, 1, 2], [3, 4], [5]] if share_context else [[i] for i in range(6)])
    ours = fast.loglikelihood(_requests("loglikelihood", pairs), disable_tqdm=True)
    theirs = ref.loglikelihood(_requests("loglikelihood", pairs), disable_tqdm=True)
    for (ll_a, g_a), (ll_b, g_b) in zip(ours, theirs, strict=True):
        assert ll_a == pytest.approx(ll_b, abs=1e-4) and g_a == g_b


def test_packing_keeps_every_segment_once_within_the_row_length():
    segments = [_Segment(prefix=[1] * n) for n in (30, 20, 20, 10, 50, 5)]
    rows = _pack(segments, capacity=50)
    assert sorted(len(s) for row in rows for s in row) == [5, 10, 20, 20, 30, 50]
    assert all(sum(len(s) for s in row) <= 50 for row in rows)
    assert len(rows) == 3  # 50 | 30+20 | 20+10+5
    batches = _batches(rows, token_budget=100)
    assert [len(b) for b in batches] == [2, 1]
