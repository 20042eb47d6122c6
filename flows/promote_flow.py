"""Promote a registered version by hand, through the same gate (and registry lock) as the scheduled runs."""

from __future__ import annotations

from prefect import flow

from tailor.config.settings import load_config
from tasks.promotion import promote_model


@flow(name="llm-tailor-promote", log_prints=False)
def promote_flow(version: str, profile: str = "quick", overrides: list[str] | None = None, force: bool = False) -> dict:
    """Judge ``version`` of the profile's registered model; ``force`` moves the alias regardless."""
    cfg = load_config(profile, overrides or [])
    return promote_model(cfg.tracking_uri, cfg.tracking.registered_model, str(version), cfg.promotion, force=force)
