import re
from dataclasses import dataclass
from typing import Any

from prefect.cache_policies import INPUTS, NONE, TASK_SOURCE, CachePolicy
from prefect.utilities.hashing import hash_objects

from tailor.store.checkpoint import code_identity


@dataclass
class CodeIdentity(CachePolicy):
    """Cache key part: the versions of llm-tailor, torch, transformers and lm-eval
    (``code_identity``). TASK_SOURCE sees only a task's own lines, not the library code it
    calls, so without this an upgrade would keep serving results the old code computed."""

    def compute_key(self, task_ctx: Any, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs: Any) -> str:
        return hash_objects(code_identity(), raise_on_failure=True)


# Cached across flow runs: same inputs + same task code + same versions -> the stored result.
CACHED = INPUTS + TASK_SOURCE + CodeIdentity()
UNCACHED = NONE


def prefect_key(text: str) -> str:
    """``text`` as a Prefect artifact or concurrency-limit key: lowercase letters, digits, dashes."""
    return re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")
