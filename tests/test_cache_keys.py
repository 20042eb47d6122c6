"""Every cache is keyed by what it was computed from (issue 24, items 1-4): the corpus files'
content, a local model folder's content, the files of a cached result as they were written,
and the versions of the code. Tiny models, no network."""

from __future__ import annotations

import inspect
import json
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

import tailor
from tailor.config.settings import DataConfig, DistillConfig, ModelConfig, PruneConfig
from tailor.data.corpus import corpus_fingerprint
from tailor.data.tokenised import tokenise_corpus, tokenised_folder, tokens_in
from tailor.models.sources import checkpoint_dir, materialize, source_fingerprint
from tailor.models.tiny import build_tiny_gemma3
from tailor.store.checkpoint import (
    FINGERPRINT_FILE,
    CheckpointError,
    code_identity,
    fingerprint_dir,
    load_model,
    write_checkpoint,
)


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def _corpus(folder: Path, topic: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "c.jsonl").write_text("".join(json.dumps({"text": f"{topic}, document {i}"}) + "\n" for i in range(14)))


@pytest.fixture()
def corpus_setup(tmp_path):
    _corpus(tmp_path / "data", "cats and dogs")
    base = materialize(ModelConfig(source="tiny"), str(tmp_path))
    distill = DistillConfig(corpus_mix={"c.jsonl": 1}, heldout_docs=3, num_samples=8, seq_len=16)
    prune = PruneConfig(calibration_samples=4, calibration_seq_len=8)
    return base, distill, prune, DataConfig(data_dir=str(tmp_path / "data")), tmp_path / "work"


class _Run:
    """What the flow's stage helpers read of a run: the settings, stage lines, logging."""

    def __init__(self, cfg):
        self.cfg = cfg

    @contextmanager
    def stage(self, name):
        yield SimpleNamespace(name=name, detail="")

    def log(self, *args, **kwargs):
        pass


def _prefect_keys(monkeypatch, call) -> list[str]:
    """The cache keys (inputs + versions) of the tasks ``call`` runs through ``run_intact``; the
    task bodies run for real, without Prefect."""
    from flows import tailor_flow
    from tasks._common import CACHED

    keys = []

    def run_intact(task, *args):
        inputs = dict(zip(inspect.signature(task.fn).parameters, args))
        keys.append(CACHED.compute_key(task_ctx=None, inputs=inputs, flow_parameters={}))
        return task.fn(*args)

    monkeypatch.setattr(tailor_flow, "run_intact", run_intact)
    call(tailor_flow)
    return keys


# 1. The tokenised corpus is keyed by the corpus files' content.


def test_an_edited_corpus_file_gives_another_tokenised_folder_and_other_tokens(corpus_setup, monkeypatch):
    base, distill, prune, data, work = corpus_setup
    before = tokenise_corpus(base, distill, prune, data, work)
    folder = tokenised_folder(base, distill, prune, data, work)
    fingerprint = corpus_fingerprint(distill, data)
    cfg = SimpleNamespace(distill=distill, prune=prune, data=data, work_dir=str(work))
    flow_key = _prefect_keys(monkeypatch, lambda flow: flow.tokenise_corpus(_Run(cfg), base))

    _corpus(Path(data.data_dir), "ships and trains")  # same file name, other text
    after = tokenise_corpus(base, distill, prune, data, work)
    assert corpus_fingerprint(distill, data) != fingerprint
    assert tokenised_folder(base, distill, prune, data, work) != folder
    assert Path(after["train"].path).parent != Path(before["train"].path).parent
    assert after["train"].fingerprint != before["train"].fingerprint
    assert not torch.equal(after["train"].samples()["input_ids"], before["train"].samples()["input_ids"])
    assert after["heldout"].fingerprint != before["heldout"].fingerprint
    # The flow hands the content to the Prefect task: its cache key changes too.
    assert _prefect_keys(monkeypatch, lambda flow: flow.tokenise_corpus(_Run(cfg), base)) != flow_key


def test_a_hub_corpus_is_keyed_by_its_name():
    hub = DataConfig(mode="hub")
    a = DistillConfig(corpus="org/one")
    assert corpus_fingerprint(a, hub) == corpus_fingerprint(a, hub)
    assert corpus_fingerprint(a, hub) != corpus_fingerprint(DistillConfig(corpus="org/two"), hub)


# 2. A local Hugging Face model folder is keyed by its content.


def test_a_model_retrained_into_the_same_folder_is_a_new_base_checkpoint(tmp_path, tiny_tokenizer, monkeypatch):
    folder = tmp_path / "my-model"
    cfg = ModelConfig(source="hf", name_or_path=str(folder))
    work = tmp_path / "work"

    def save(seed: int):
        model = build_tiny_gemma3(tiny_tokenizer, num_layers=2, seed=seed)
        model.save_pretrained(folder)
        tiny_tokenizer.save_pretrained(folder)
        return model

    save(0)
    first = materialize(cfg, str(work))
    flow_cfg = SimpleNamespace(model=cfg, work_dir=str(work))
    flow_key = _prefect_keys(monkeypatch, lambda flow: flow.materialize_base(_Run(flow_cfg)))
    content = source_fingerprint(cfg)

    retrained = save(1)
    assert source_fingerprint(cfg) != content
    second = materialize(cfg, str(work))
    assert Path(second.path) == checkpoint_dir(cfg, str(work)) != Path(first.path)
    assert second.fingerprint != first.fingerprint
    loaded = load_model(second)[0]
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), retrained.state_dict().values()))
    assert _prefect_keys(monkeypatch, lambda flow: flow.materialize_base(_Run(flow_cfg))) != flow_key
    # The folder's path is not its key: a copy elsewhere is the same base model.
    assert materialize(cfg.model_copy(update={"name_or_path": str(folder)}), str(work)) == second


# 3. An edited cached file is rebuilt, not fingerprinted as it now is.


def test_a_flipped_byte_in_a_checkpoint_is_rebuilt_and_a_users_folder_still_refused(tmp_path):
    folder = tmp_path / "checkpoints" / "pruned-x"
    calls = []

    def writer(tmp: Path) -> None:
        calls.append(tmp)
        (tmp / "model.safetensors").write_bytes(b"weights" * 1000)
        (tmp / "config.json").write_text("{}")

    ref = write_checkpoint(folder, writer)
    assert write_checkpoint(folder, writer) == ref and len(calls) == 1  # intact: reused
    _flip_last_byte(folder / "model.safetensors")
    again = write_checkpoint(folder, writer)
    assert len(calls) == 2 and again == ref and again.verify(contents=True)
    assert fingerprint_dir(folder) == ref.fingerprint
    assert sorted(p.name for p in folder.parent.iterdir()) == ["pruned-x"]  # nothing set aside is left

    user = tmp_path / "my-model"
    user.mkdir()
    (user / "model.safetensors").write_bytes(b"mine")
    with pytest.raises(CheckpointError, match="is not an llm-tailor checkpoint"):
        write_checkpoint(user, writer)
    assert len(calls) == 2 and [p.name for p in user.iterdir()] == ["model.safetensors"]
    assert (user / "model.safetensors").read_bytes() == b"mine"


def test_a_flipped_byte_in_the_base_checkpoint_is_materialised_again(tmp_path):
    ref = materialize(ModelConfig(source="tiny"), str(tmp_path))
    weights = next(Path(ref.path).glob("*.safetensors"))
    _flip_last_byte(weights)
    again = materialize(ModelConfig(source="tiny"), str(tmp_path))
    assert again == ref and again.verify(contents=True)


def test_a_flipped_byte_in_a_distilled_checkpoint_is_distilled_again(tmp_path):
    from unit_data import tiny_distillation_inputs

    from tailor.distill.trainer import distill_checkpoint

    base, pruned, cfg, tokens = tiny_distillation_inputs(tmp_path, teacher_dtype="float32")
    out = tmp_path / "distilled"
    ref, _ = distill_checkpoint(base, pruned, cfg, tokens["train"], out, unkeyed_ok=True)
    weights = next(out.glob("*.safetensors"))
    trained = weights.read_bytes()
    _flip_last_byte(weights)
    again, record = distill_checkpoint(base, pruned, cfg, tokens["train"], out, unkeyed_ok=True)
    # Trained again (the record's timings differ, so the fingerprint does), to the same weights.
    assert again.path == ref.path and again.verify(contents=True) and record.optimizer_steps > 0
    assert weights.read_bytes() == trained


def test_an_edited_token_file_is_rebuilt_not_fingerprinted_again(corpus_setup):
    base, distill, prune, data, work = corpus_setup
    sets = tokenise_corpus(base, distill, prune, data, work)
    train = Path(sets["train"].path)
    original = train.read_bytes()
    train.write_bytes(Path(sets["calibration"].path).read_bytes())
    # The recorded fingerprint, not the edited file's: every consumer's check now fails.
    assert tokens_in(train.parent) == sets
    with pytest.raises(RuntimeError, match="do not match fingerprint"):
        tokens_in(train.parent)["train"].verify()
    again = tokenise_corpus(base, distill, prune, data, work)
    assert again == sets and train.read_bytes() == original and again["train"].verify()
    # A file whose record was lost (a kill between the two writes) counts as not written.
    Path(str(train) + ".sha256").unlink()
    assert tokenise_corpus(base, distill, prune, data, work) == sets
    assert load_file(str(train)).keys() == {"input_ids", "attention_mask"}


# 4. The versions of the code are in every key.


def test_another_code_version_gives_other_keys(corpus_setup, monkeypatch):
    from tailor.evaluate.joint import scoring_identity
    from tailor.prune.pruning import prune_checkpoint
    from tasks._common import CACHED, CodeIdentity
    from tasks.models import distilled_folder

    base, distill, prune, data, work = corpus_setup
    distill = distill.model_copy(update={"teacher_dtype": "float32"})
    sets = tokenise_corpus(base, distill, prune, data, work)

    def keys() -> dict:
        return {
            "identity": code_identity(),
            "prefect": CodeIdentity().compute_key(task_ctx=None, inputs={}, flow_parameters={}),
            "cached": CACHED.compute_key(task_ctx=None, inputs={"x": 1}, flow_parameters={}),
            "base": checkpoint_dir(ModelConfig(source="tiny"), str(work)),
            "tokenised": tokenised_folder(base, distill, prune, data, work),
            "pruned": prune_checkpoint(base, [1], str(work))[0].path,
            "distilled": distilled_folder(base, base, distill, sets["train"], sets["heldout"], str(work)),
            "answers": scoring_identity("fast", "float32", 8, True),
        }

    now = keys()
    assert now == keys()  # deterministic
    assert set(now["identity"]) == {"tailor", "torch", "transformers", "lm_eval"}
    monkeypatch.setattr(tailor, "__version__", tailor.__version__ + ".post1")
    upgraded = keys()
    assert {k for k in now if now[k] != upgraded[k]} == set(now)
    assert FINGERPRINT_FILE in {p.name for p in Path(upgraded["pruned"]).iterdir()}


def test_a_data_file_a_task_yaml_names_outside_include_path_is_part_of_the_evaluation_key(tmp_path):
    from tailor.config.settings import DataConfig, EvalConfig
    from tailor.evaluate.harness import evaluation_signature, task_data_files

    tasks, data_dir = tmp_path / "tasks", tmp_path / "elsewhere"
    tasks.mkdir()
    data_dir.mkdir()
    (data_dir / "docs.jsonl").write_text('{"q": "one"}\n')
    (tasks / "mine.yaml").write_text(
        "task: mine\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data_dir / 'docs.jsonl'}\n"
        "process_docs: !function utils.process_docs\noutput_type: multiple_choice\n"
    )
    cfg = EvalConfig(tasks=("arc_easy",), include_path=str(tasks))
    data = DataConfig(mode="hub")
    assert task_data_files(tasks) == [(data_dir / "docs.jsonl").resolve()]
    before = evaluation_signature(cfg, data)
    assert evaluation_signature(cfg, data) == before
    (data_dir / "docs.jsonl").write_text('{"q": "two"}\n')
    assert evaluation_signature(cfg, data) != before
