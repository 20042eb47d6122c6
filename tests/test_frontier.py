"""The size-quality frontier: candidate cuts, each size's verdict against the margin, and the flow
end to end on the tiny model through Prefect, its candidates on a local Dask cluster."""

from __future__ import annotations

import json

import pytest

from tailor.prune.cuts import contiguous_cuts
from tailor.prune.pruning import PruneError
from tailor.report.frontier import BEYOND, CANNOT_TELL, WITHIN, frontier_rows, largest_within, verdict


def test_candidate_cuts_end_at_the_last_layer_then_move_earlier_and_keep_the_first_layer():
    assert contiguous_cuts(18, 4, 3) == [[14, 15, 16, 17], [13, 14, 15, 16], [12, 13, 14, 15]]
    assert contiguous_cuts(4, 2, 5) == [[2, 3], [1, 2]]  # never layer 0
    with pytest.raises(PruneError, match="frontier.sizes: a cut of 3 layers does not fit a 4-layer model"):
        contiguous_cuts(4, 3, 1)


def test_a_size_is_within_the_margin_only_when_every_tasks_interval_is_above_it():
    assert verdict({"ci_low": -0.04, "ci_high": 0.01}, 0.05) == WITHIN
    assert verdict({"ci_low": -0.09, "ci_high": -0.06}, 0.05) == BEYOND
    assert verdict({"ci_low": -0.07, "ci_high": -0.01}, 0.05) == CANNOT_TELL

    def scored(accs: dict[str, list[int]], params: int, seconds: float) -> dict:
        return {
            "metrics": {task: {"acc": {"value": sum(v) / len(v)}} for task, v in accs.items()},
            "items": {task: {f"doc{i}": {"acc": a} for i, a in enumerate(v)} for task, v in accs.items()},
            "profile": {"params": params, "macs_per_token": params, "gen_time_mean_s": seconds, "run_times_s": []},
        }

    n = 200
    original = scored({"a": [1] * n, "b": [1, 0] * (n // 2)}, 100, 1.0)
    small_cut = scored({"a": [1] * n, "b": [1, 0] * (n // 2)}, 90, 0.9)  # no change at all
    big_cut = scored({"a": [1] * (n // 2) + [0] * (n // 2), "b": [1, 0] * (n // 2)}, 80, 0.8)  # a loses half
    rows = frontier_rows(
        original,
        [
            {**cut, "size": size, "removed_layers": [size], "heldout_ppl": 1.0, "candidates": []}
            for size, cut in ((4, big_cut), (2, small_cut))
        ],
        0.05,
    )
    assert [r["size"] for r in rows] == [2, 4]
    assert rows[0]["within_margin"] and not rows[1]["within_margin"]
    assert rows[1]["acc_delta_per_task"]["a"]["verdict"] == BEYOND
    assert rows[0]["params_saved_pct"] == pytest.approx(10.0) and rows[1]["speedup"] == pytest.approx(1.25)
    assert largest_within(rows)["size"] == 2
    assert largest_within(rows[1:]) is None


@pytest.mark.integration
def test_the_frontier_flow_chooses_each_sizes_cut_after_a_short_heal_on_dask_workers(tmp_path, shared_data):
    pytest.importorskip("prefect_dask", reason="prefect-dask is in the test extra: pip install -e '.[test]'")
    from flows.frontier_flow import frontier_flow
    from flows.runners import frontier_runner
    from tailor.config.settings import load_config

    overrides = [
        f"work_dir={tmp_path / 'work'}",
        f"data.data_dir={shared_data}",
        "frontier.sizes=[1,2]",
        "frontier.candidates=2",
        "frontier.screen_samples=8",
        "distill.objective=hidden",
        "distill.freeze_embeddings=true",
        "distill.train_last_layers=1",
        "distill.teacher_dtype=float32",
    ]
    cfg = load_config("smoke", overrides)
    state = frontier_flow.with_options(task_runner=frontier_runner(cfg.runner))(
        profile="smoke", overrides=overrides, out_dir=str(tmp_path / "out"), return_state=True
    )
    assert state.is_completed(), state.message
    result = state.result()
    report = json.loads((tmp_path / "out" / "frontier.json").read_text())
    rows = report["rows"]
    assert [r["size"] for r in rows] == [1, 2]
    for row in rows:
        candidates = row["candidates"]
        assert len(candidates) == 2
        best = min(candidates, key=lambda c: c["heldout_ppl"])
        assert row["removed_layers"] == best["removed_layers"]
        assert set(row["acc_delta_per_task"]) == set(cfg.eval.tasks)
        assert row["within_margin"] == all(t["verdict"] == WITHIN for t in row["acc_delta_per_task"].values())
    assert rows[0]["params"] > rows[1]["params"]
    assert result["largest_within_margin"] == report["largest_within_margin"]
    assert (tmp_path / "out" / "frontier.png").stat().st_size > 0
    assert (
        "Largest cut within the margin" in (tmp_path / "out" / "frontier.md").read_text()
        or "No size is within" in (tmp_path / "out" / "frontier.md").read_text()
    )
    # Each size's healed model trained from the activation cache (the objective reads hidden states).
    assert any((tmp_path / "work" / "activations").iterdir())
