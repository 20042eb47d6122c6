"""Several models scored in one lm-eval pass: shared layers run once, every answer kept per model.

The flow evaluates the original, pruned and distilled models on the same documents. lm-eval
builds each task's requests once; ``JointLM`` scores the requests that any model still lacks
for those models together (the layers they share with the first run once, see
``tailor.prune.trunk``), keeps each model's answers in its ``AnswerStore`` and hands lm-eval one
model's answers at a time (``reply_as``), so lm-eval computes every model's metrics itself,
exactly as for a model evaluated alone.

An ``AnswerStore`` is a file per model and scoring setup in the work folder: a model that was
scored before (the original, on a re-run with another distillation recipe) is not scored
again, and an evaluation killed between looks resumes from the answers it saved.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from tailor.config.settings import TailorError
from tailor.evaluate.fast_lm import FastHFLM, Request, _batches, _pack
from tailor.prune.trunk import final_hidden_states, same_trunk_settings, shared_depths
from tailor.store.checkpoint import code_identity, stable_hash, write_file_atomically

ANSWERS_FORMAT = 1
"""Bumped whenever what a stored answer means or how it is computed changes: older stores are
then not read (their file names change)."""

Answer = tuple[float, bool]


class JointEvaluationError(TailorError, ValueError):
    """Models that cannot be evaluated together, or a task this evaluation cannot score."""


def scoring_identity(backend: str, dtype: str, batch_size: int, share_context: bool) -> dict:
    """What an answer depends on besides the model's weights and the request's tokens: how it is
    scored and the code that scores it (packing changes float rounding, so the batch size counts)."""
    return {
        "format": ANSWERS_FORMAT,
        "backend": backend,
        "dtype": dtype,
        "batch_size": batch_size,
        "share_context": share_context,
        **code_identity(),
    }


def request_key(context: Sequence[int], continuation: Sequence[int]) -> str:
    return hashlib.sha256(json.dumps([list(context), list(continuation)]).encode()).hexdigest()[:24]


class AnswerStore:
    """One model's answers to lm-eval loglikelihood requests, by ``request_key``."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.answers: dict[str, Answer] = {}
        if self.path.exists():
            try:
                stored = json.loads(self.path.read_text())
                self.answers = {k: (float(v[0]), bool(v[1])) for k, v in stored["answers"].items()}
            except (ValueError, KeyError, TypeError, IndexError):
                # Unreadable (not the product's format): scored again and replaced.
                self.answers = {}

    @classmethod
    def for_model(cls, folder: Path, fingerprint: str, identity: dict) -> AnswerStore:
        return cls(Path(folder) / f"{stable_hash(fingerprint, identity)}.json")

    def __contains__(self, key: str) -> bool:
        return key in self.answers

    def save(self) -> None:
        write_file_atomically(self.path, lambda tmp: tmp.write_text(json.dumps({"answers": self.answers})))


@dataclass
class Participant:
    """A model of the joint evaluation: loaded only when it has requests to score."""

    name: str
    store: AnswerStore
    load: Callable[[], torch.nn.Module]
    model: torch.nn.Module | None = None

    def loaded(self) -> torch.nn.Module:
        if self.model is None:
            self.model = self.load()
        return self.model


class JointLM(FastHFLM):
    """FastHFLM over several models; lm-eval sees the answers of ``participants[reply_as]``.

    Built on the first participant's model (lm-eval reads the tokenizer, device and maximum
    length from it); ``bind`` hands it every participant.
    """

    participants: list[Participant]
    reply_as: int = 0

    def bind(self, participants: list[Participant]) -> None:
        self.participants = participants
        # Each look and each model's final pass hands lm-eval the same documents again: their
        # requests are tokenised and keyed once, not once per call.
        self._encoded: dict[tuple[str, str], tuple[list[int], list[int]]] = {}
        self._keys: dict[tuple[tuple[int, ...], tuple[int, ...]], str] = {}
        self.scored_requests = {p.name: 0 for p in participants}
        """Per model, requests scored since binding: 0 for a model whose answers were all stored."""
        self.trunk_depths: dict[str, int] = {}
        """Per model scored, the leading layers it shared with the deepest model scored beside it."""

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        pair = (context, continuation)
        if pair not in self._encoded:
            self._encoded[pair] = super()._encode_pair(context, continuation)
        return self._encoded[pair]

    def _key(self, context: list[int], continuation: list[int]) -> str:
        tokens = (tuple(context), tuple(continuation))
        if tokens not in self._keys:
            self._keys[tokens] = request_key(context, continuation)
        return self._keys[tokens]

    def _loglikelihood_tokens(
        self, requests: list[Request], disable_tqdm: bool = False, override_bs: int | None = None
    ) -> list[Answer]:
        keys = [self._key(ctx, cont) for _, ctx, cont in requests]
        lacking = [p for p in self.participants if any(k not in p.store for k in keys)]
        if lacking:
            todo = sorted({i for i, k in enumerate(keys) if any(k not in p.store for p in lacking)})
            self._score_together(lacking, [requests[i] for i in todo], [keys[i] for i in todo], override_bs)
        answers = [self.participants[self.reply_as].store.answers[k] for k in keys]
        for request, answer in zip(requests, answers):
            if request[0] is not None:
                self.cache_hook.add_partial("loglikelihood", request[0], answer)
        return answers

    def _score_together(
        self, participants: list[Participant], requests: list[Request], keys: list[str], override_bs: int | None
    ) -> None:
        # The deepest model runs whole; the others start from the layers they share with it.
        participants = sorted(participants, key=lambda p: -p.loaded().config.num_hidden_layers)
        models = [p.loaded() for p in participants]
        for model in models[1:]:
            if not same_trunk_settings(models[0].config, model.config):
                raise JointEvaluationError(
                    f"{participants[0].name} and {participants[models.index(model)].name} differ in more than their "
                    "layers (vocabulary, attention or rotary settings); evaluate them separately"
                )
        depths = shared_depths(models)
        rows_per_batch = override_bs or (self.batch_size if isinstance(self.batch_size, int) else 8)
        segments = self._segments(requests)
        rows = _pack(segments, max(self.pack_tokens, max(len(s) for s in segments)))
        done = 0
        for batch_rows in _batches(rows, rows_per_batch * self.pack_tokens):
            batch = self._packed(batch_rows)
            with self._scoring_context():
                hidden = final_hidden_states(models, depths, batch.ids, batch.masks, batch.pos)
                for p, model, h in zip(participants, models, hidden):
                    for i, answer in self._answers_from_hidden(model, h, batch):
                        p.store.answers[keys[i]] = answer
            done += len(batch.owners)
            if self.on_progress is not None:
                self.on_progress(done, len(requests))
        for p, depth in zip(participants, depths):
            p.store.save()
            self.scored_requests[p.name] += len(requests)
            self.trunk_depths[p.name] = depth

    def generate_until(self, requests, disable_tqdm: bool = False):
        # check_tasks(scored_jointly=True) refuses these before any work; a group may still hide one.
        names = sorted({getattr(r, "task_name", "?") for r in requests})
        raise JointEvaluationError(
            f"eval.tasks: {', '.join(names)} generates text; the flow scores its models together on loglikelihood "
            "tasks (multiple choice, LAMBADA, perplexity)"
        )


@dataclass(frozen=True)
class StopRule:
    """The gate's question, asked of each task as documents come in: is ``candidate``'s accuracy
    within ``margin`` of ``baseline``'s? A task stops scoring once it is answered (see
    ``tailor.evaluate.sequential``), or at ``eval.limit``."""

    baseline: str
    candidate: str
    margin: float
    block: int
    metric: str = "acc"
    futility: float = 0.0
    """Stop an undecided task once the cap would decide it with less than this conditional power (0 = never)."""


@dataclass
class JointEvaluation:
    """Per model, the result ``harness.evaluate_model`` would give on the documents each task used;
    per task, how many documents that was and why scoring stopped."""

    results: dict[str, dict]
    stopping: dict[str, dict]
    scored_requests: dict[str, int]
    trunk_depths: dict[str, int]


def evaluate_together(
    models: dict[str, tuple[str, Callable[[], tuple]]],
    cfg,
    data,
    answers_dir: Path,
    rule: StopRule | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> JointEvaluation:
    """Evaluate ``models`` ({name: (fingerprint, loader returning (model, tokenizer))}) on the
    same documents of ``cfg.tasks``. The first model is always loaded (lm-eval reads its
    tokenizer); the others only if they have requests their stores lack.

    Without ``rule`` every task runs to ``cfg.limit``. With it, documents are scored in blocks
    of ``rule.block`` in lm-eval's order (the same for every model), and a task stops at the
    first look that answers the rule's question at the stated error rate.
    """
    from tailor.evaluate import harness, sequential

    identity = scoring_identity(cfg.backend, cfg.dtype, cfg.batch_size, cfg.share_context)
    names = list(models)
    first_model, tokenizer = models[names[0]][1]()
    participants = [
        Participant(name, AnswerStore.for_model(answers_dir, fingerprint, identity), _model_only(load, tokenizer, name))
        for name, (fingerprint, load) in models.items()
    ]
    participants[0].model = first_model
    lm = JointLM(pretrained=first_model, tokenizer=tokenizer, batch_size=cfg.batch_size)
    lm.share_context, lm.on_progress = cfg.share_context, on_progress
    lm.bind(participants)

    manager = harness._task_manager(cfg.include_path)
    harness.check_tasks(cfg.tasks, data, cfg.include_path, manager, scored_jointly=True)
    tasks, sizes = _built_tasks(harness.task_specs(cfg.tasks, data, manager), manager, cfg.limit)

    # A look needs each document's score only: no bootstrapped standard errors (lambada's perplexity).
    look_cfg = cfg.model_copy(update={"bootstrap_iters": 0})

    def run(reply_as: str, task_names: list[str], limit: int | None, look: bool = False) -> dict:
        lm.reply_as = names.index(reply_as)
        return harness.run_lm_eval(lm, tasks(task_names), manager, look_cfg if look else cfg, limit)

    stopping: dict[str, dict] = {}
    groups: dict[int | None, list[str]] = {}
    if rule is None:
        stopping = {task: {"documents": None, "reason": "limit"} for task in cfg.tasks}
        groups = {cfg.limit: list(cfg.tasks)}
    else:
        # Each task's looks are fixed before any scoring: at the blocks, up to its limit or its size.
        looks = {t: sequential.look_schedule(min(cfg.limit, sizes.get(t) or cfg.limit), rule.block) for t in cfg.tasks}
        open_tasks = list(cfg.tasks)
        while open_tasks:
            n = min(next(x for x in looks[t] if x not in _asked(stopping, t)) for t in open_tasks)
            asked = [t for t in open_tasks if n in looks[t]]
            base, cand = run(rule.baseline, asked, n, look=True), run(rule.candidate, asked, n, look=True)
            for task in asked:
                k = looks[task].index(n)
                stopping.setdefault(task, {"looks": []})["looks"].append(n)
                diffs = _paired_diffs(base["samples"][task], cand["samples"][task], rule.metric)
                if diffs is None:  # no accuracy to ask about (a perplexity task): scored to its limit
                    if k == len(looks[task]) - 1:
                        stopping[task].update(documents=n, reason="limit")
                        open_tasks.remove(task)
                    continue
                look = sequential.decide(diffs, rule.margin, looks[task], k, futility=rule.futility)
                if look.outcome != "continue":
                    stopping[task].update(documents=n, reason=look.outcome, **_look_fields(look))
                    open_tasks.remove(task)
        for task in cfg.tasks:
            groups.setdefault(stopping[task]["documents"], []).append(task)

    results = {}
    for name in names:
        parts = [harness.summarise(run(name, group, n), group, cfg, data) for n, group in groups.items()]
        results[name] = _merged(parts, cfg.tasks)
        results[name]["documents"] = {t: results[name]["n_samples"][t] for t in cfg.tasks}
    for task, stop in stopping.items():
        stop["documents"] = results[names[0]]["n_samples"][task]
    return JointEvaluation(results, stopping, dict(lm.scored_requests), dict(lm.trunk_depths))


def _model_only(load: Callable[[], tuple], tokenizer, name: str) -> Callable[[], torch.nn.Module]:
    def loaded() -> torch.nn.Module:
        model, own_tokenizer = load()
        if not same_tokenizer(tokenizer, own_tokenizer):
            raise JointEvaluationError(f"{name} has another tokenizer than the first model; evaluate it separately")
        return model

    return loaded


def same_tokenizer(a, b) -> bool:
    """Two tokenizers that turn every text into the same ids (their full serialisations agree)."""
    if a is b:
        return True
    backend_a, backend_b = getattr(a, "backend_tokenizer", None), getattr(b, "backend_tokenizer", None)
    if backend_a is None or backend_b is None:
        return a.get_vocab() == b.get_vocab() and a.all_special_ids == b.all_special_ids
    return backend_a.to_str() == backend_b.to_str() and a.all_special_ids == b.all_special_ids


def _built_tasks(specs: list, manager, limit: int | None) -> tuple[Callable[[list[str]], list], dict[str, int]]:
    """Each task built once (its documents read once, its requests built once for up to ``limit``
    documents) and handed to every lm-eval call, and its number of documents; a group (tasks
    under one name) is rebuilt from its spec each call."""
    from lm_eval.api.task import Task
    from lm_eval.tasks import get_task_dict

    built = get_task_dict(specs, manager)
    by_name: dict[str, object] = {}
    sizes: dict[str, int] = {}
    for spec in specs:
        name = spec if isinstance(spec, str) else spec.get("task")
        task = built.get(name)
        by_name[name] = task if isinstance(task, Task) else spec
        if isinstance(task, Task):
            sizes[name] = len(task.eval_docs)
            _build_requests_once(task, limit)
    return (lambda names: [by_name[n] for n in names]), sizes


def _build_requests_once(task, most: int | None) -> None:
    """Make ``task`` build its requests once, for the ``most`` documents any call will ask for
    (None: all), and hand each call with the same options the requests of its first ``limit``.

    Each look and each model's final pass asks lm-eval for the same documents again; building a
    document's requests (its templates) costs more than answering it from the stores, and looks
    at n, 2n, ... documents would rebuild every earlier block each time. lm-eval writes answers
    into its requests, so every call gets fresh copies. A call for more documents than were
    built builds again; chosen samples or another rank build as lm-eval does.
    """
    build = task.build_all_requests
    built: dict[str, _DocumentRequests] = {}

    def build_all_requests(*, limit=None, samples=None, rank=0, world_size=1, **options) -> None:
        if samples is not None or rank or world_size != 1:
            return build(limit=limit, samples=samples, rank=rank, world_size=world_size, **options)
        key = json.dumps(options, sort_keys=True, default=repr)
        have = built.get(key)
        if have is None or not have.covers(limit):
            upto = None if limit is None or most is None else max(limit, most)
            build(limit=upto, **options)
            have = built[key] = _DocumentRequests(
                task.instances, everything=upto is None or upto >= len(task.eval_docs)
            )
        task._instances = have.first(limit)

    task.build_all_requests = build_all_requests


class _DocumentRequests:
    """A task's requests grouped by document, in lm-eval's order."""

    def __init__(self, instances: list, everything: bool) -> None:
        self.by_doc: dict[int, list] = {}
        for inst in instances:
            self.by_doc.setdefault(inst.doc_id, []).append(inst)
        self.everything = everything

    def covers(self, limit: int | None) -> bool:
        return self.everything or (limit is not None and limit <= len(self.by_doc))

    def first(self, limit: int | None) -> list:
        groups = list(self.by_doc.values())[:limit]
        return [_fresh(inst) for group in groups for inst in group]


def _fresh(instance):
    """A copy of a request without the answers an earlier call wrote into it."""
    out = copy.copy(instance)
    out.resps, out.filtered_resps = [], {}
    return out


def _asked(stopping: dict[str, dict], task: str) -> list[int]:
    return stopping.get(task, {}).get("looks", [])


def _paired_diffs(base: list[dict], cand: list[dict], metric: str):
    import numpy as np

    b = {str(s["doc_id"]): s[metric] for s in base if metric in s}
    c = {str(s["doc_id"]): s[metric] for s in cand if metric in s}
    shared = [d for d in b if d in c]
    if not shared:
        return None
    return np.asarray([float(c[d]) - float(b[d]) for d in shared])


def _look_fields(look) -> dict:
    return {
        "delta": float(look.delta),
        "interval": [float(look.ci_low), float(look.ci_high)],
        "level": float(look.level),
        "documents_to_decide": None if look.documents_to_decide is None else int(look.documents_to_decide),
        "conditional_power": look.conditional_power,
    }


def _merged(parts: list[dict], tasks: Sequence[str]) -> dict:
    merged = dict(parts[0])
    for key in ("metrics", "items", "n_samples", "requests"):
        merged[key] = {t: next(p[key][t] for p in parts if t in p[key]) for t in tasks}
    return merged


def evaluate_checkpoints(
    refs: dict,
    cfg,
    data,
    work_dir: str,
    rule: StopRule | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> tuple[JointEvaluation, dict[str, Path]]:
    """``evaluate_together`` for checkpoints ({name: CheckpointRef}); each model's result is also
    written to the work folder, named by its weights, the settings, the data and the documents
    each task used. Returns the evaluation and those files."""
    from tailor.common.layout import WorkDir
    from tailor.evaluate.harness import evaluation_signature
    from tailor.store.checkpoint import load_model

    models = {
        name: (ref.fingerprint, lambda ref=ref: load_model(ref.verify(), dtype=cfg.dtype)) for name, ref in refs.items()
    }
    evals = WorkDir(work_dir).evals
    joint = evaluate_together(models, cfg, data, evals / "answers", rule, on_progress)
    signature = evaluation_signature(cfg, data)
    files = {}
    for name, ref in refs.items():
        result = joint.results[name]
        key = stable_hash(ref.fingerprint, cfg.model_dump(), data.cache_identity(), signature, result["documents"])
        files[name] = evals / f"{key}.json"
        write_file_atomically(files[name], lambda tmp, r=result: tmp.write_text(json.dumps(r, indent=1)))
    return joint, files
