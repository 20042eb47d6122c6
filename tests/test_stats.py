import numpy as np
import pytest

from tailor.common.stats import paired_bootstrap, paired_item_deltas, percentile_interval, score_interval


def test_identical_models_have_a_zero_interval():
    a = [1, 0, 1, 1, 0, 1, 0, 0]
    r = paired_bootstrap(a, a)
    assert (r["delta"], r["ci_low"], r["ci_high"], r["significant"]) == (0.0, 0.0, 0.0, False)


def test_clear_loss_is_significant_and_noise_is_not():
    rng = np.random.default_rng(1)
    base = rng.integers(0, 2, 400).tolist()
    worse = [b if rng.random() > 0.5 else 0 for b in base]
    r = paired_bootstrap(base, worse)
    assert r["significant"] and r["ci_high"] < 0 and r["ci_low"] <= r["delta"] <= r["ci_high"]
    flipped = base[:]
    flipped[0], flipped[1] = 1 - flipped[0], 1 - flipped[1]
    assert not paired_bootstrap(base, flipped)["significant"]


def test_pairing_uses_shared_items_only():
    base = {"0": {"acc": 1.0}, "1": {"acc": 0.0}, "2": {"acc": 1.0}}
    other = {"0": {"acc": 0.0}, "1": {"acc": 0.0}}
    r = paired_item_deltas(base, other, "acc")
    assert r["n"] == 2 and r["delta"] == pytest.approx(-0.5)
    assert paired_item_deltas(base, other, "acc_norm") is None
    with pytest.raises(ValueError, match="differ in number"):
        paired_bootstrap([1, 0], [1])


def test_score_interval_is_1_96_standard_errors_within_0_and_1():
    low, high = score_interval({"value": 0.5, "stderr": 0.1})
    assert (low, high) == (pytest.approx(0.304), pytest.approx(0.696))
    assert score_interval({"value": 0.98, "stderr": 0.02}) == (pytest.approx(0.9408), 1.0)
    assert score_interval({"value": 0.5, "stderr": None}) is None
    assert score_interval({"value": 0.5}) is None


def test_interval_bounds_off_zero_by_float_rounding_are_zero():
    # 0.1 + 0.2 - 0.3 is 5.6e-17 in float: a bound that is zero in exact arithmetic.
    noise = (0.1 + 0.2) - 0.3
    assert noise != 0.0
    assert percentile_interval(np.full(100, noise)) == (0.0, 0.0)
    assert percentile_interval(np.array([np.nan, 0.25, 0.5])) == (0.25625, 0.49375)
