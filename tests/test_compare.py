import pytest

from tailor.report import plots
from tailor.report.compare import build_report, render_markdown, retention_pct, write_figures


def _profile(params, layers, t):
    return {
        "params": params,
        "layers": layers,
        "checkpoint_bytes": params * 4,
        "gen_time_mean_s": t,
        "gen_time_std_s": 0.01,
        "tokens_per_s": 150 / t,
        "sample_prompt": "Paris is the capital of",
        "sample_continuation": " France",
    }


def _eval(acc, ppl):
    return {
        "metrics": {
            "arc_easy": {"acc": {"value": acc, "stderr": 0.05}},
            "lambada_openai": {"acc": {"value": acc / 2, "stderr": 0.05}, "perplexity": {"value": ppl, "stderr": 1.0}},
        }
    }


def test_retention_directions():
    assert retention_pct("acc", 0.5, 0.4) == pytest.approx(80.0)
    assert retention_pct("perplexity", 10.0, 20.0) == pytest.approx(50.0)
    assert retention_pct("acc", 0.0, 0.4) is None


def test_report_deltas_speedup_and_markdown():
    report = build_report(
        {"original": _profile(1000, 18, 5.0), "pruned": _profile(900, 16, 4.0), "distilled": _profile(900, 16, 4.0)},
        {"original": _eval(0.6, 10.0), "pruned": _eval(0.3, 20.0), "distilled": _eval(0.45, 12.5)},
        {"profile": "unit", "pruning": {"removed_layers": [16, 17]}},
    )
    pruned = report["vs_original"]["pruned"]
    assert pruned["tasks"]["arc_easy"]["acc"]["delta"] == pytest.approx(-0.3)
    assert pruned["tasks"]["arc_easy"]["acc"]["retention_pct"] == pytest.approx(50.0)
    assert pruned["mean_acc_retention_pct"] == pytest.approx(50.0)
    assert pruned["speedup"] == pytest.approx(1.25)
    assert pruned["params_removed_pct"] == pytest.approx(10.0)
    distilled = report["vs_original"]["distilled"]
    assert distilled["tasks"]["lambada_openai"]["perplexity"]["retention_pct"] == pytest.approx(80.0)
    md = render_markdown(report)
    assert "| arc_easy | acc | 0.6000 ± 0.0500 | 0.3000 ± 0.0500 | -0.3000 | 50.0% |" in md
    assert "1.25x" in md and "[16, 17]" in md


def test_report_carries_paired_intervals_when_items_are_given():
    items_orig = {str(i): {"acc": 1.0} for i in range(50)}
    items_pruned = {str(i): {"acc": 0.0 if i < 40 else 1.0} for i in range(50)}
    evals = {
        "original": {**_eval(1.0, 10.0), "items": {"arc_easy": items_orig}},
        "pruned": {**_eval(0.2, 20.0), "items": {"arc_easy": items_pruned}},
        "distilled": {**_eval(1.0, 10.0), "items": {"arc_easy": items_orig}},
    }
    profiles = {n: _profile(1000, 18, 5.0) for n in ("original", "pruned", "distilled")}
    report = build_report(profiles, evals, {"pruning": {"removed_layers": [17]}})
    pruned = report["vs_original"]["pruned"]["tasks"]["arc_easy"]["acc"]
    low, high = pruned["paired_ci95"]
    assert high < 0 and pruned["significant"]
    distilled = report["vs_original"]["distilled"]["tasks"]["arc_easy"]["acc"]
    assert distilled["paired_ci95"] == [0.0, 0.0] and not distilled["significant"]
    md = render_markdown(report)
    assert f"**-0.8000 [{low:+.3f}, {high:+.3f}]**" in md
    assert "paired" not in str(report["vs_original"]["pruned"]["tasks"]["lambada_openai"])


def test_accuracy_figure_draws_each_bars_95_percent_interval(tmp_path, monkeypatch):
    report = build_report(
        {"original": _profile(1000, 18, 5.0), "pruned": _profile(900, 16, 4.0), "distilled": _profile(900, 16, 4.0)},
        {"original": _eval(0.6, 10.0), "pruned": _eval(0.3, 20.0), "distilled": _eval(0.45, 12.5)},
        {},
    )
    report["models"]["pruned"]["metrics"]["arc_easy"]["acc"]["stderr"] = None  # lm-eval gave none
    drawn = {}
    real = plots.grouped_bars_png

    def spy(groups, bars, y_label, title, path, intervals=None):
        drawn[path.name] = (groups, bars, intervals)
        return real(groups, bars, y_label, title, path, intervals)

    monkeypatch.setattr(plots, "grouped_bars_png", spy)
    figures = write_figures(report, tmp_path)
    groups, bars, intervals = drawn[figures["Accuracy per task"]]
    assert groups == ["arc_easy", "lambada_openai"]
    assert bars["original"] == [0.6, 0.3]
    assert intervals["original"] == [
        (pytest.approx(0.502), pytest.approx(0.698)),
        (pytest.approx(0.202), pytest.approx(0.398)),
    ]
    assert intervals["pruned"][0] is None and intervals["pruned"][1] == (pytest.approx(0.052), pytest.approx(0.248))
    assert (tmp_path / "accuracy.png").stat().st_size > 0


def test_error_offsets_are_distances_below_and_above_each_bar():
    import math

    below, above = plots._error_offsets([0.5, 0.2], [(0.4, 0.7), None])
    assert below[0] == pytest.approx(0.1) and above[0] == pytest.approx(0.2)
    assert math.isnan(below[1]) and math.isnan(above[1])


def _timed(profile: dict, times: list[float], timed_as: str, macs: int) -> dict:
    return {**profile, "run_times_s": times, "timed_as": timed_as, "macs_per_token": macs, "architecture": timed_as}


def test_models_of_one_architecture_share_one_timing_in_the_report():
    base_times, pruned_times = [5.0, 5.5, 5.2, 5.1, 5.3], [4.0, 4.4, 4.16, 4.08, 4.24]
    profiles = {
        "original": _timed(_profile(1000, 18, 5.2), base_times, "original", 800_000_000),
        "pruned": _timed(_profile(900, 16, 4.2), pruned_times, "pruned", 700_000_000),
        "distilled": _timed(_profile(900, 16, 4.2), pruned_times, "pruned", 700_000_000),
    }
    speed = {"prompts": ["The capital of France is"], "max_new_tokens": 24, "warmup_runs": 1, "timed_runs": 5}
    report = build_report(
        profiles,
        {"original": _eval(0.6, 10.0), "pruned": _eval(0.3, 20.0), "distilled": _eval(0.45, 12.5)},
        {"pruning": {"removed_layers": [16, 17]}, "config": {"speed": speed}},
    )
    pruned, distilled = report["vs_original"]["pruned"], report["vs_original"]["distilled"]
    assert pruned["speedup"] == pytest.approx(1.25) and distilled["speedup"] == pruned["speedup"]
    assert distilled["speedup_ci95"] == pruned["speedup_ci95"]
    assert distilled["timed_as"] == "pruned"
    assert distilled["macs_ratio"] == pytest.approx(8 / 7)
    assert distilled["params_ratio"] == pytest.approx(1000 / 900)
    assert report["timing_groups"] == {"pruned": ["pruned", "distilled"]}
    assert report["speed_tie"] is None
    md = render_markdown(report)
    assert "pruned and distilled share one architecture and one timing (of pruned)" in md
    assert "| multiply-adds per token (M) | 800.0 | 700.0 | 700.0 |" in md
    assert "| multiply-adds ratio (original / model) | 1.00x | 1.14x | 1.14x |" in md
    assert "| parameter ratio (original / model) | 1.00x | 1.11x | 1.11x |" in md
    assert "attention's score products" in md and "noisy" not in md
    # What was timed: a speed-up holds for generation of that length.
    assert "Timed on 1 prompt(s) x 24 new tokens (greedy), 5 interleaved rounds after 1 warm-up" in md


def test_a_report_without_multiply_adds_or_shared_timing_says_neither():
    report = build_report(
        {"original": _profile(1000, 18, 5.0), "pruned": _profile(900, 16, 4.0), "distilled": _profile(900, 16, 4.0)},
        {"original": _eval(0.6, 10.0), "pruned": _eval(0.3, 20.0), "distilled": _eval(0.45, 12.5)},
        {},
    )
    assert report["timing_groups"] == {} and report["vs_original"]["pruned"]["macs_ratio"] is None
    md = render_markdown(report)
    assert "| multiply-adds ratio (original / model) | 1.00x | n/a | n/a |" in md
    assert "share one" not in md and "attention's score products" not in md and "Timed on" not in md
