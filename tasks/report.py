"""The comparison task: join every stage's record into report.json / report.md."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from tailor.report.compare import (
    build_report,
    comparison_table,
    load_scores,
    render_markdown,
    write_figures,
    write_report,
)

from ._common import UNCACHED
from .records import Evaluation


@task(name="compare-models", cache_policy=UNCACHED)
def compare_models(profiles: dict[str, dict], evals: dict[str, Evaluation], extra: dict, out_dir: str) -> dict:
    """Write the report files, publish the report as a Prefect artifact; returns the report."""
    with_items = {name: {"metrics": e.metrics, **load_scores(e.items_file)} for name, e in evals.items()}
    report = build_report(profiles, with_items, extra)
    report["figures"] = write_figures(report, Path(out_dir), extra.get("pruning", {}).get("plot"))
    json_path, md_path = write_report(report, Path(out_dir))
    create_table_artifact(
        key="tailor-comparison",
        table=comparison_table(report),
        description=f"Original vs pruned vs distilled, profile {extra.get('profile')} "
        "(* = the paired 95% interval excludes zero)",
    )
    publish_report(report, Path(out_dir))
    return {**report, "report_json": str(json_path), "report_md": str(md_path)}


@task(name="record-promotion", cache_policy=UNCACHED)
def record_promotion(report_json: str, decision: dict) -> None:
    """Add the gate's decision to the report files and the report artifact."""
    import json

    path = Path(report_json)
    report = {**json.loads(path.read_text()), "promotion": decision}
    write_report(report, path.parent)
    publish_report(report, path.parent)


def publish_report(report: dict, out_dir: Path) -> None:
    create_markdown_artifact(
        key="tailor-report",
        markdown=render_markdown(report, figure_dir=out_dir),
        description=f"llm-tailor comparison, profile {report.get('profile')}",
    )
