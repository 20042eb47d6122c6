import pytest

from tailor.config.settings import ConfigError, TailorConfig, available_profiles, describe_settings, load_config


def test_profiles_load_and_resolve_absolute_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("TAILOR_HOME", raising=False)
    assert {"smoke", "quick", "heal", "book"} <= set(available_profiles())
    for name in ("smoke", "quick", "book"):
        cfg = load_config(name)
        assert cfg.profile == name
        assert cfg.work_dir == str(tmp_path / "tailor-work")
        assert cfg.data.data_dir == str(tmp_path / "tailor-work" / "data")
    book = load_config("book")
    assert (book.distill.temperature, book.distill.learning_rate, book.distill.batch_size) == (2.0, 1e-5, 8)
    assert (book.distill.grad_accum, book.distill.epochs, book.distill.num_samples) == (4, 3, 15000)
    assert book.eval.limit is None and book.data.mode == "hub"


def test_overrides_are_typed():
    cfg = load_config(
        "smoke", ["eval.limit=3", "prune.strategy=indices", "prune.indices=[0, 2]", "distill.temperature=1.5"]
    )
    assert cfg.eval.limit == 3
    assert cfg.prune.indices == (0, 2)
    assert cfg.distill.temperature == 1.5


def test_a_profiles_own_cut_must_be_unset_for_another_strategy():
    # quick names its cut (layers 15-16); another strategy says how to drop it instead of ignoring it.
    with pytest.raises(ConfigError, match=r"prune.indices=null"):
        load_config("quick", ["prune.strategy=angular"])
    cfg = load_config("quick", ["prune.strategy=angular", "prune.num_layers=4", "prune.indices=null"])
    assert (cfg.prune.strategy, cfg.prune.num_layers, cfg.prune.indices) == ("angular", 4, None)


def test_later_distillation_phases_change_only_what_they_name():
    cfg = load_config(
        "smoke",
        ["distill.linear_map=true", "distill.objective=hidden", "distill.then=[{objective: logits, num_samples: 4}]"],
    )
    first, second = cfg.distill.phases()
    assert (first.objective, first.linear_map, first.num_samples, first.then) == ("hidden", True, 16, [])
    # The student the second phase starts from already holds the map: it is not fitted twice.
    assert (second.objective, second.linear_map, second.num_samples) == ("logits", False, 4)
    assert second.model_dump() == {**first.model_dump(), "objective": "logits", "linear_map": False, "num_samples": 4}
    # The first phase's cache keys hash model_dump: a later phase must not enter them.
    assert "then" not in cfg.distill.model_dump()
    assert cfg.settings_record()["distill"]["then"] == [{"objective": "logits", "num_samples": 4}]
    assert len(load_config("smoke").distill.phases()) == 1


@pytest.mark.parametrize(
    "phase, needle",
    [
        ("{corpus_mix: {x.jsonl: 1}}", r"then\[0\] sets corpus_mix, which a later phase cannot change; allowed: obj"),
        ("{num_samples: 17}", r"then\[0\].num_samples=17 is more than the 16 samples"),
        ("{objective: soft}", r"then\[0\]: objective: distill.objective 'soft' is not one of logits, hidden, span"),
        ("{learning_rate: 0}", r"then\[0\]: learning_rate: distill.learning_rate must be > 0"),
    ],
)
def test_a_bad_later_phase_is_refused_naming_it(phase, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config("smoke", [f"distill.then=[{phase}]"])


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["eval.limt=3"], "did you mean limit"),
        (["nosuch.key=1"], "unknown setting 'nosuch'"),
        (["model.source=gpt5"], "model.source"),
        (["eval.limit=0"], "eval.limit must be >= 1"),
        (["prune.strategy=indices", "prune.indices=[1, 1]"], "duplicates"),
        (["distill.temperature=0"], "distill.temperature must be > 0"),
        (["distill.seq_len=1"], "distill.seq_len must be >= 2"),
        (["eval.tasks=[]"], "at least one task"),
        (["eval.limit"], "section.key=value"),
        (["distill.alpha=1.5"], r"distill.alpha must be in \[0, 1\]"),
        (["distill.jsd_beta=0"], r"distill.jsd_beta must be in \(0, 1\)"),
        (["distill.loss=kl"], "distill.loss"),
    ],
)
def test_bad_settings_name_the_setting(overrides, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config("smoke", overrides)


def test_literal_errors_list_allowed_values():
    with pytest.raises(ConfigError) as err:
        load_config("smoke", ["data.mode=cloud"])
    assert "'offline'" in str(err.value) and "'hub'" in str(err.value) and "cloud" in str(err.value)


def test_unknown_profile_lists_profiles():
    with pytest.raises(ConfigError, match="allowed: .*quick.*smoke"):
        load_config("nope")


def test_every_setting_has_help():
    lines = describe_settings().splitlines()
    assert len(lines) > 30
    assert all(line.split(": ", 1)[1].strip() for line in lines), "a setting lacks a doc string"
    # A default built by a factory is shown as its value.
    assert any(line.startswith("distill.then (default []): Further training phases") for line in lines)
    assert not [line for line in lines if "PydanticUndefined" in line]
    assert TailorConfig.model_fields.keys() >= {"model", "data", "eval", "prune", "distill", "tracking"}


@pytest.mark.parametrize(
    "override, needle",
    [
        ("speed.prompts=[]", "speed.prompts"),
        ("distill.weight_decay=-0.1", "distill.weight_decay"),
        ("tracking.registered_model=it's-mine", "tracking.registered_model"),
        ("tracking.alias=latest", "tracking.alias='latest' is reserved"),
        ("promotion.champion_alias=v3", "promotion.champion_alias='v3' is reserved"),
        ("tracking.alias=champion", "tracking.alias and promotion.champion_alias are both 'champion'"),
    ],
)
def test_settings_that_would_mislead_later_stages_are_refused(override, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config("smoke", [override])


def test_the_champion_alias_is_never_set_without_the_gate_even_with_promotion_off():
    # With the gate off, a registration under the champion alias would still move it.
    with pytest.raises(ConfigError, match="tracking.alias and promotion.champion_alias are both 'champion'"):
        load_config("smoke", ["promotion.enabled=false", "tracking.alias=champion"])
    with pytest.raises(ConfigError, match="both 'best'"):
        load_config("smoke", ["promotion.enabled=false", "promotion.champion_alias=best", "tracking.alias=best"])


@pytest.mark.parametrize(
    "override, needle",
    [
        ("distill.teacher_topk=100000", "distill.teacher_topk=100000 exceeds the model's vocabulary of"),
        ("distill.seq_len=4096", "distill.seq_len=4096 exceeds the model's context of 512 tokens"),
    ],
)
def test_settings_beyond_the_models_limits_fail_before_work(override, needle):
    from tailor.models.sources import source_limits
    from tailor.preflight import check_model_limits

    cfg = load_config("smoke", [override])
    with pytest.raises(ConfigError, match=needle):
        check_model_limits(cfg, *source_limits(cfg.model))


@pytest.mark.integration
@pytest.mark.parametrize("name", ["quick", "heal"])
def test_shipped_cpu_profiles_pass_preflight_on_the_offline_data(name, shared_data, tmp_path):
    from tailor.preflight import preflight

    # Catches a recipe the corpus cannot feed (a share larger than a source holds) before a user's run does.
    preflight(load_config(name, [f"work_dir={tmp_path}", f"data.data_dir={shared_data}"]))
