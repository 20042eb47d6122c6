"""Models evaluated together give, request for request, the bits each gives evaluated alone."""

from __future__ import annotations

import copy

import pytest
import torch
from lm_eval.api.instance import Instance

from tailor.config.settings import DataConfig, EvalConfig
from tailor.evaluate.fast_lm import FastHFLM
from tailor.evaluate.harness import evaluate_model
from tailor.evaluate.joint import AnswerStore, JointLM, Participant, evaluate_together
from tailor.prune.pruning import prune_layers
from tailor.prune.trunk import decoder_layers, shared_depths

PAIRS = [
    ("The capital of France is", " Paris"),
    ("The capital of France is", " a whale"),
    ("A student learns from", " a teacher and more"),
    ("A student learns from", " the lazy dog"),
    ("The quick brown fox " * 30, " ok"),
    ("Hello", " world"),
]


def _family(model):
    """original (6 layers), pruned (last layer removed), distilled (pruned, last layer changed),
    middle (layer 2 removed): the shapes of model the flow evaluates together."""
    pruned = prune_layers(copy.deepcopy(model), [5])
    distilled = copy.deepcopy(pruned)
    with torch.no_grad():
        for p in decoder_layers(distilled)[4].parameters():
            p.add_(0.01 * torch.randn_like(p))
    middle = prune_layers(copy.deepcopy(model), [2])
    return {"original": model, "pruned": pruned, "distilled": distilled, "middle": middle}


def _instances(pairs):
    return [Instance("loglikelihood", {}, args, i) for i, args in enumerate(pairs)]


def test_trunk_depth_is_read_off_the_weights(tiny_model):
    models = _family(tiny_model)
    assert shared_depths(list(models.values())) == [0, 5, 4, 2]
    other = copy.deepcopy(models["pruned"])
    with torch.no_grad():
        other.get_input_embeddings().weight.add_(1e-3)
    assert shared_depths([models["original"], other]) == [0, 0]


def test_joint_scoring_equals_separate_scoring_bit_for_bit(tiny_model, tiny_tokenizer, tmp_path):
    models = _family(tiny_model)
    participants = [
        Participant(name, AnswerStore(tmp_path / f"{name}.json"), lambda m=m: m) for name, m in models.items()
    ]
    joint = JointLM(pretrained=tiny_model, tokenizer=tiny_tokenizer, batch_size=2)
    joint.bind(participants)
    for j, (name, model) in enumerate(models.items()):
        joint.reply_as = j
        together = joint.loglikelihood(_instances(PAIRS), disable_tqdm=True)
        alone = FastHFLM(pretrained=model, tokenizer=tiny_tokenizer, batch_size=2).loglikelihood(
            _instances(PAIRS), disable_tqdm=True
        )
        assert together == alone, name
    # Every model was scored in the first call: the other three came from the stores.
    assert joint.scored_requests == dict.fromkeys(models, len(PAIRS))
    assert joint.trunk_depths == {"original": 0, "pruned": 5, "distilled": 4, "middle": 2}


def test_evaluate_together_matches_evaluate_model_and_is_kept_per_model(
    tiny_model, tiny_tokenizer, unit_data, tmp_path
):
    models = _family(tiny_model)
    del models["middle"]
    cfg = EvalConfig(limit=4, batch_size=3)
    data = DataConfig(data_dir=str(unit_data))
    loads = {name: 0 for name in models}

    def loader(name):
        def load():
            loads[name] += 1
            return models[name], tiny_tokenizer

        return load

    refs = {name: (f"fingerprint-{name}", loader(name)) for name in models}
    joint = evaluate_together(refs, cfg, data, tmp_path / "answers")
    for name, model in models.items():
        alone = evaluate_model(model, tiny_tokenizer, cfg, data)
        assert joint.results[name]["requests"] == alone["requests"], name
        assert joint.results[name]["metrics"] == alone["metrics"], name
    assert joint.trunk_depths == {"original": 0, "pruned": 5, "distilled": 4}
    assert all(stop["reason"] == "limit" and stop["documents"] == 4 for stop in joint.stopping.values())

    # Again, with the distilled model changed: only it is loaded and scored.
    loads = dict.fromkeys(loads, 0)
    refs["distilled"] = ("fingerprint-distilled-2", loader("distilled"))
    again = evaluate_together(refs, cfg, data, tmp_path / "answers")
    assert loads == {"original": 1, "pruned": 0, "distilled": 1}
    assert again.scored_requests == {"original": 0, "pruned": 0, "distilled": joint.scored_requests["distilled"]}
    assert again.results["pruned"] == joint.results["pruned"]


def test_a_model_with_another_tokenizer_is_refused(tiny_model, tiny_tokenizer, unit_data, tmp_path):
    from tailor.evaluate.joint import JointEvaluationError
    from tailor.models.tiny import build_tiny_tokenizer

    other = build_tiny_tokenizer(vocab_size=300)
    refs = {
        "original": ("a", lambda: (tiny_model, tiny_tokenizer)),
        "pruned": ("b", lambda: (prune_layers(copy.deepcopy(tiny_model), [5]), other)),
    }
    with pytest.raises(JointEvaluationError, match="another tokenizer"):
        evaluate_together(refs, EvalConfig(limit=2), DataConfig(data_dir=str(unit_data)), tmp_path)


def test_scoring_until_decided_stops_each_task_at_a_planned_look(tiny_model, tiny_tokenizer, unit_data, tmp_path):
    from tailor.evaluate.joint import StopRule

    models = _family(tiny_model)
    refs = {name: (f"fp-{name}", lambda m=models[name]: (m, tiny_tokenizer)) for name in ("original", "distilled")}
    cfg = EvalConfig(limit=5, batch_size=3)
    data = DataConfig(data_dir=str(unit_data))
    # Looks at 2, 4 and 5 documents. A margin of 1 is shown within before the last look; a
    # margin of 0 can never be shown for identical models: they run to the cap.
    within = evaluate_together(refs, cfg, data, tmp_path, StopRule("original", "distilled", 1.0, block=2))
    for task in ("arc_easy", "hellaswag", "winogrande", "lambada_openai"):
        stop = within.stopping[task]
        assert stop["reason"] == "within" and stop["looks"] == [2, 4][: len(stop["looks"])], task
        n = stop["documents"]
        assert n == stop["looks"][-1] < 5
        assert within.results["original"]["n_samples"][task] == within.results["distilled"]["n_samples"][task] == n
    same = {name: (f"fp-{name}", lambda: (tiny_model, tiny_tokenizer)) for name in ("original", "distilled")}
    capped = evaluate_together(same, cfg, data, tmp_path, StopRule("original", "distilled", 0.0, block=2))
    for task, stop in capped.stopping.items():
        # Looks at 2, 4 and 5, or up to the task's size when it has fewer documents.
        assert stop["reason"] == "cap" and stop["looks"][:2] == [2, 4] and stop["documents"] == stop["looks"][-1]
        assert stop["interval"][0] <= 0 <= stop["interval"][1]
    # With a futility rule that gives up below 99% conditional power, the same undecidable question
    # stops at the first look past a quarter of the cap, with no claim and both models on its documents.
    rule = StopRule("original", "distilled", 0.0, block=2, futility=0.99)
    futile = evaluate_together(same, cfg, data, tmp_path, rule)
    for task, stop in futile.stopping.items():
        assert stop["reason"] == "futile" and stop["looks"] == [2] and stop["documents"] == 2, task
        assert 0 <= stop["conditional_power"] < 0.99 and stop["interval"][0] <= 0 <= stop["interval"][1]
        assert futile.results["original"]["n_samples"][task] == futile.results["distilled"]["n_samples"][task] == 2


def test_a_task_that_generates_text_is_refused_before_any_work():
    from tailor.evaluate.harness import EvalSetupError, check_tasks

    with pytest.raises(EvalSetupError, match="reports"):  # scored alone, only its metric is in question
        check_tasks(("gsm8k",), DataConfig(mode="hub"))
    with pytest.raises(EvalSetupError, match="'gsm8k' generates text"):
        check_tasks(("gsm8k",), DataConfig(mode="hub"), scored_jointly=True)


def test_requests_are_built_once_and_every_call_gets_fresh_copies_of_the_first_limit(unit_data):
    from tailor.evaluate import harness
    from tailor.evaluate.joint import _built_tasks

    data = DataConfig(data_dir=str(unit_data))
    manager = harness._task_manager(None)
    specs = harness.task_specs(("arc_easy", "winogrande"), data, manager)
    tasks, _ = _built_tasks(specs, manager, 5)
    fresh, _ = _built_tasks(specs, manager, None)
    for task, plain in zip(tasks(["arc_easy", "winogrande"]), fresh(["arc_easy", "winogrande"])):
        for limit in (2, 5, 4):
            task.build_all_requests(limit=limit)
            plain.build_all_requests(limit=limit)
            got = [(i.doc_id, i.idx, i.arguments, i.resps) for i in task.instances]
            assert got == [(i.doc_id, i.idx, i.arguments, []) for i in plain.instances], (task, limit)
            # lm-eval writes answers into the requests it is handed: the next call must not see them.
            for inst in task.instances:
                inst.resps.append("answer")
