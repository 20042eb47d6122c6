"""Shared fixtures. Prefect and MLflow state live in a per-session temp folder.

Tiers: plain tests (tiny random models, seconds), ``integration`` (the whole flow
through a real Prefect and a real MLflow sqlite store), ``slow`` (the real
embedded gemma-3-270m with small limits).
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

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "benchmarks").is_dir():
        pytest.fail(f"offline test data not found at {SHARED_DATA} (the shared/ folder beside the repo)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from tailor.tiny import build_tiny_tokenizer

    return build_tiny_tokenizer()


@pytest.fixture()
def tiny_model(tiny_tokenizer):
    from tailor.tiny import build_tiny_gemma3

    return build_tiny_gemma3(tiny_tokenizer, num_layers=6, seed=0)


@pytest.fixture()
def tiny_llama(tiny_tokenizer):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tiny_tokenizer), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=5, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, pad_token_id=tiny_tokenizer.pad_token_id)
    return LlamaForCausalLM(config).eval()
