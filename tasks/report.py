"""The comparison task: join every stage's record into report.json / report.md."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact

from tailor.compare import build_report, load_items, render_markdown, write_report

from ._common import UNCACHED


@task(name="compare-models", cache_policy=UNCACHED)
def compare_models(profiles: dict[str, dict], evals: dict[str, dict], extra: dict, out_dir: str) -> dict:
    """Write the report files, publish the report as a Prefect artifact; returns the report."""
    with_items = {name: {**record, "items": load_items(record["items_file"])} for name, record in evals.items()}
    report = build_report(profiles, with_items, extra)
    json_path, md_path = write_report(report, Path(out_dir))
    create_markdown_artifact(key="tailor-report", markdown=render_markdown(report),
                             description=f"llm-tailor comparison, profile {extra.get('profile')}")
    return {**report, "report_json": str(json_path), "report_md": str(md_path)}
