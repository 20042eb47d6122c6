"""Evaluate until decided: the look plan, the group-sequential boundaries, one look's decision, and the rule's
error rate and power by simulation."""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np
import pytest

from tailor.common.stats import paired_bootstrap
from tailor.evaluate.sequential import (
    ALPHA,
    FUTILITY_FROM,
    RHO,
    conditional_power,
    critical_values,
    decide,
    documents_to_decide,
    explain,
    look_schedule,
    margin_sd,
    run_until_decided,
    simulate,
    spending,
    synthetic_diffs,
)

MARGIN = 0.05
REPS = 2000
# Each wrong claim ("within" when delta <= -margin, "beyond" when delta >= -margin) is bounded by alpha/2.
# The realised rate over REPS replications is a binomial estimate: allow three standard errors of
# Monte Carlo noise around the bound (0.025 + 0.0105), so the test fails only on a real excess.
NOMINAL = ALPHA / 2
SLACK = 3 * math.sqrt(NOMINAL * (1 - NOMINAL) / REPS)


def _diffs(losses: int, gains: int, n: int) -> np.ndarray:
    return np.array([-1.0] * losses + [1.0] * gains + [0.0] * (n - losses - gains))


def test_looks_are_whole_blocks_then_exactly_the_limit():
    assert look_schedule(500, 100) == [100, 200, 300, 400, 500]
    assert look_schedule(250, 100) == [100, 200, 250]
    assert look_schedule(100, 100) == [100]
    assert look_schedule(40, 100) == [40]
    assert look_schedule(1, 1) == [1]


@pytest.mark.parametrize(
    ("limit", "block", "setting"),
    [(500, 0, "eval.sequential_block"), (500, 2.5, "eval.sequential_block"), (0, 100, "eval.limit")],
)
def test_a_bad_plan_names_its_setting(limit, block, setting):
    with pytest.raises(ValueError, match=setting):
        look_schedule(limit, block)


def test_an_unbounded_limit_cannot_be_planned():
    with pytest.raises(ValueError, match="finite eval.limit"):
        look_schedule(None, 100)


def test_power_spending_shares_sum_to_alpha_and_save_most_for_the_cap():
    shares = spending([100, 200, 300, 400, 500])
    assert sum(shares) == pytest.approx(ALPHA, abs=1e-15)
    assert shares[0] == pytest.approx(ALPHA * 0.2**3)
    assert all(0 < a < b for a, b in zip(shares, shares[1:]))
    assert spending([250]) == [ALPHA]
    with pytest.raises(ValueError, match="increase strictly"):
        spending([200, 100])


def _union_bound_z(looks: list[int]) -> list[float]:
    """The previous rule's per-look z: each look at its own two-sided share (Bonferroni over looks)."""
    return [NormalDist().inv_cdf(1 - a / 2) for a in spending(looks)]


def test_one_look_is_the_fixed_sample_boundary():
    assert critical_values([400]) == (pytest.approx(NormalDist().inv_cdf(0.975), abs=1e-12),)
    assert critical_values([1]) == critical_values([400])


def test_two_looks_spend_exactly_their_shares():
    # Independent of the recursion: P(Z1 <= c1, Z2 > c2) by quadrature over Z1, with Z2 | Z1 normal.
    erfc = np.frompyfunc(math.erfc, 1, 1)
    for looks in ([100, 200], [100, 250], [200, 201]):
        c1, c2 = critical_values(looks)
        t1 = looks[0] / looks[1]
        shares = spending(looks)
        assert 1 - NormalDist().cdf(c1) == pytest.approx(shares[0] / 2, rel=1e-9)
        r = math.sqrt(t1)
        z = np.linspace(-12.0, c1, 400_001)
        tail = erfc((c2 - r * z) / math.sqrt(1 - r * r) / math.sqrt(2)).astype(float) / 2
        f = np.exp(-z * z / 2) / math.sqrt(2 * math.pi) * tail
        second = float(np.sum((f[1:] + f[:-1]) / 2 * np.diff(z)))  # trapezoid rule
        assert second == pytest.approx(shares[1] / 2, abs=1e-7), looks


def test_the_boundaries_realise_the_spending_on_brownian_paths():
    # Z_k = W(t_k) / sqrt(t_k): the canonical joint distribution the boundaries are solved under.
    looks = look_schedule(800, 100)
    c = np.array(critical_values(looks))
    t = np.array(looks) / looks[-1]
    paths = 400_000
    steps = np.random.default_rng(0).standard_normal((paths, len(t))) * np.sqrt(np.diff(t, prepend=0.0))
    z = np.cumsum(steps, axis=1) / np.sqrt(t)
    crossed = np.maximum.accumulate(z > c, axis=1).mean(axis=0)
    planned = ALPHA / 2 * t**RHO
    assert np.all(np.abs(crossed - planned) <= 4 * np.sqrt(planned * (1 - planned) / paths) + 1e-5), crossed
    # The other claim's boundary is -c by symmetry: each side spends alpha / 2.
    assert np.maximum.accumulate(z < -c, axis=1).mean(axis=0)[-1] == pytest.approx(ALPHA / 2, abs=1e-3)


def test_the_boundaries_are_well_inside_the_union_bound():
    for limit in (500, 800):
        looks = look_schedule(limit, 100)
        c, union = critical_values(looks), _union_bound_z(looks)
        assert all(b < a for a, b in zip(c, c[1:]))  # equal steps: each look is easier to pass than the last
        assert all(exact < bound for exact, bound in zip(c[1:], union[1:])) and c[0] == pytest.approx(union[0])
        assert 1.96 < c[-1] < 2.1 < 2.2 < union[-1]
    assert critical_values(look_schedule(800, 100)) is critical_values(tuple(look_schedule(800, 100)))  # cached
    many = critical_values(look_schedule(500, 5))  # 100 looks
    assert len(many) == 100 and 1.96 < many[-1] < 2.25


def test_each_look_reports_its_own_boundary():
    looks = look_schedule(800, 100)
    d = synthetic_diffs(-0.03, 0.25, (800,), np.random.default_rng(2))
    for k, c in enumerate(critical_values(looks)):
        look = decide(d, MARGIN, looks, k)
        sd = (look.ci_high - look.ci_low) / 2 / c * math.sqrt(look.n)
        assert look.ci_low == pytest.approx(look.delta - c * sd / math.sqrt(look.n))
        assert look.level == pytest.approx(1 - 2 * (1 - NormalDist().cdf(c)))
        assert NormalDist().inv_cdf(1 - (1 - look.level) / 2) == pytest.approx(c)


def test_one_look_is_the_fixed_sample_95_percent_interval():
    # Observed delta on the margin: the margin's fitted sd is the sample's own (ddof 0), so the sample sd
    # (ddof 1) is the larger and the interval is the plain mean +- 1.96 sd / sqrt(n).
    d = _diffs(90, 70, 400)
    look = decide(d, MARGIN, [400], 0)
    half = NormalDist().inv_cdf(0.975) * float(d.std(ddof=1)) / math.sqrt(400)
    assert look.level == pytest.approx(0.95)
    assert (look.ci_low, look.ci_high) == (pytest.approx(d.mean() - half), pytest.approx(d.mean() + half))
    assert look.outcome == "cap" and run_until_decided(d, MARGIN, [400]) == look
    # And it agrees with the report's paired bootstrap interval over the same documents.
    same = np.random.default_rng(4).integers(0, 2, 400).astype(float)
    base, other = np.where(d == 0, same, d < 0), np.where(d == 0, same, d > 0)
    boot = paired_bootstrap(base.astype(float).tolist(), other.astype(float).tolist())
    assert boot["delta"] == pytest.approx(look.delta)
    assert abs(boot["ci_low"] - look.ci_low) < 0.005 and abs(boot["ci_high"] - look.ci_high) < 0.005


def test_decide_look_by_look_is_the_whole_procedure():
    looks = look_schedule(500, 100)
    rng = np.random.default_rng(7)
    for delta in (-0.12, -0.05, 0.0, 0.05):
        d = synthetic_diffs(delta, 0.25, (500,), rng)
        stop = run_until_decided(d, MARGIN, looks)
        by_look = [decide(d, MARGIN, looks, k) for k in range(len(looks))]
        first = next(look for look in by_look if look.outcome != "continue")
        assert stop == first
        assert all(look.outcome == "continue" for look in by_look[: stop.look_index])


def test_one_document_or_identical_answers_never_decide_on_nothing():
    for d in ([0.0], [1.0], [-1.0]):
        assert not decide(np.array(d), MARGIN, [1], 0).decided
    # All equal: the sample sd is 0; the margin's sd (the least a difference of -margin can have) is used.
    assert margin_sd(0, 0, 100, MARGIN) == pytest.approx(math.sqrt(MARGIN * (1 - MARGIN)))
    look = decide(np.zeros(100), MARGIN, [100], 0)
    half = 1.96 * math.sqrt(MARGIN * (1 - MARGIN)) / 10
    assert (look.ci_low, look.ci_high) == (pytest.approx(-half, rel=1e-3), pytest.approx(half, rel=1e-3))
    # No margin to lean on: identical answers sit exactly on it, and no number of documents decides that.
    cap = decide(np.zeros(1000), 0.0, [1000], 0)
    assert cap.outcome == "cap" and cap.documents_to_decide is None and cap.ci_low < 0 < cap.ci_high
    assert "sits on the margin" in explain(cap, 0.0)


@pytest.mark.parametrize(("losses", "gains", "n", "margin"), [(0, 0, 50, 0.05), (12, 3, 100, 0.05), (2, 9, 40, 0.1)])
def test_the_margin_sd_is_the_restricted_maximum_likelihood_fit(losses, gains, n, margin):
    q = np.linspace(margin, (1 + margin) / 2, 100_001)
    with np.errstate(divide="ignore", invalid="ignore"):
        ll = losses * np.log(q) + gains * np.log(q - margin) + (n - losses - gains) * np.log(1 - 2 * q + margin)
    best = q[np.argmax(np.nan_to_num(ll, nan=-np.inf))]
    expected = math.sqrt(2 * best - margin - margin**2)
    assert margin_sd(losses, gains, n, margin) == pytest.approx(expected, abs=1e-4)
    assert margin_sd(losses, gains, n, margin) >= math.sqrt(margin * (1 - margin)) - 1e-12


def test_the_cap_says_how_many_documents_would_decide():
    d = _diffs(40, 30, 500)  # delta -0.02, 0.03 from the margin: undecided at 500
    look = decide(d, MARGIN, look_schedule(500, 100), 4)
    assert look.outcome == "cap" and look.n == look.limit == 500
    z = NormalDist().inv_cdf(1 - (1 - look.level) / 2)
    sd = (look.ci_high - look.ci_low) / 2 / z * math.sqrt(500)
    assert look.documents_to_decide == math.ceil((z * sd / 0.03) ** 2) > 500
    # At that size, the same delta and sd would just be decided.
    half = z * sd / math.sqrt(look.documents_to_decide)
    assert look.delta - half > -MARGIN
    assert f"about {look.documents_to_decide:,} documents would decide it" in explain(look, MARGIN)
    on_margin = decide(_diffs(10, 5, 100), MARGIN, [100], 0)
    assert on_margin.delta == -MARGIN and on_margin.documents_to_decide is None
    assert documents_to_decide(-0.02, 0.4, MARGIN, 2.0, 100) == math.ceil((2.0 * 0.4 / 0.03) ** 2)
    assert decide(d, MARGIN, look_schedule(500, 100), 0).documents_to_decide is None  # only at the cap


def test_explain_says_documents_used_and_why_it_stopped():
    looks = look_schedule(500, 100)
    early = run_until_decided(_diffs(0, 0, 500), MARGIN, looks)
    assert early.outcome == "within" and early.n < 500
    assert explain(early, MARGIN).startswith(f"stopped after {early.n} of 500 documents")
    beyond = run_until_decided(_diffs(150, 0, 500), MARGIN, looks)
    assert beyond.outcome == "beyond" and "shown beyond -0.05" in explain(beyond, MARGIN)


def test_bad_inputs_are_refused():
    looks = [100, 200]
    with pytest.raises(ValueError, match="needs 200 paired differences"):
        decide(np.zeros(150), MARGIN, looks, 1)
    with pytest.raises(ValueError, match=r"\{-1, 0, 1\}"):
        decide(np.full(100, 0.5), MARGIN, looks, 0)
    with pytest.raises(ValueError, match="outside the plan"):
        decide(np.zeros(200), MARGIN, looks, 2)
    with pytest.raises(ValueError, match="max_task_drop"):
        decide(np.zeros(200), -0.1, looks, 0)


@pytest.mark.parametrize("discordance", [0.15, 0.3])
@pytest.mark.parametrize("delta", [-MARGIN - 0.04, -MARGIN, -MARGIN + 0.02, 0.0])
def test_the_realised_error_rate_stays_at_or_under_alpha_over_2(delta, discordance, record_property):
    row = simulate(
        delta, discordance, MARGIN, limit=500, block=100, reps=REPS, seed=round(1000 * (1 + delta + discordance))
    )
    record_property("realised", row)
    shown = f"delta {delta:+.3f}, discordance {discordance}: {row}; bound {NOMINAL} + {SLACK:.4f} Monte Carlo slack"
    if delta <= -MARGIN:
        assert row.within <= NOMINAL + SLACK, shown
    if delta >= -MARGIN:
        assert row.beyond <= NOMINAL + SLACK, shown
    if delta == -MARGIN:
        # On the margin nothing decides it: almost every task runs to the cap.
        assert row.cap >= 0.9 and row.mean_documents > 490, shown


@pytest.mark.parametrize("limit", [500, 800])
def test_on_the_margin_with_the_fewest_discordances_the_error_stays_bounded(limit):
    # Every discordant document lost (P(+1) = 0): few discordances, where a plain interval is most fragile.
    row = simulate(-MARGIN, MARGIN, MARGIN, limit=limit, block=100, reps=REPS, seed=3)
    assert row.within <= NOMINAL + SLACK and row.beyond <= NOMINAL + SLACK, str(row)


@pytest.mark.parametrize("discordance", [0.1, 0.2, 0.3])
def test_on_the_margin_with_eight_looks_the_error_stays_bounded(discordance):
    row = simulate(-MARGIN, discordance, MARGIN, limit=800, block=100, reps=REPS, seed=round(100 * discordance))
    assert row.within <= NOMINAL + SLACK and row.beyond <= NOMINAL + SLACK, str(row)


def test_a_clear_drop_is_shown_beyond_about_as_often_as_a_fixed_sample_would():
    # delta -0.092 at discordance 0.2 over at most 800 documents: the union bound showed it beyond 66% of the
    # time (20,000 samples), a fixed 800 at 95% 78%; the exact boundaries 76%, after 625 documents on average.
    row = simulate(-0.092, 0.2, MARGIN, limit=800, block=100, reps=REPS, seed=9)
    assert row.beyond >= 0.72 and row.within == 0 and row.mean_documents < 680, str(row)


def test_clear_cases_are_decided_and_a_clearly_fine_task_stops_early():
    plan = {"margin": MARGIN, "limit": 2000, "block": 250, "reps": 500}
    beyond = simulate(-MARGIN - 0.04, 0.15, **plan, seed=5)
    assert beyond.beyond >= 0.9, str(beyond)
    fine = simulate(0.0, 0.15, **plan, seed=6)
    assert fine.within >= 0.9 and fine.mean_documents < 0.6 * 2000, str(fine)


# Stopping for futility (eval.sequential_futility): no more wrong claims, fewer documents on the margin.


@pytest.mark.parametrize("discordance", [0.05, 0.2, 0.3])
def test_stopping_for_futility_keeps_each_wrong_claim_under_alpha_over_2(discordance):
    row = simulate(-MARGIN, discordance, MARGIN, limit=800, block=100, reps=REPS, seed=21, futility=0.1)
    assert row.within <= NOMINAL + SLACK and row.beyond <= NOMINAL + SLACK, str(row)


def test_futility_stops_a_change_on_the_margin_long_before_the_cap():
    plain = simulate(-0.045, 0.25, MARGIN, limit=1200, block=150, reps=1000, seed=22)
    futile = simulate(-0.045, 0.25, MARGIN, limit=1200, block=150, reps=1000, seed=22, futility=0.1)
    assert plain.mean_documents > 1150 and futile.mean_documents < 0.6 * plain.mean_documents, (plain, futile)


def test_with_futility_and_a_higher_cap_a_clear_drop_is_decided_as_often_as_at_800_without():
    # The trade the quick profile makes: 1200 documents with futility 0.1 against 800 without.
    at_800 = simulate(-0.092, 0.25, MARGIN, limit=800, block=100, reps=REPS, seed=23)
    futile = simulate(-0.092, 0.25, MARGIN, limit=1200, block=150, reps=REPS, seed=23, futility=0.1)
    assert futile.beyond >= at_800.beyond - 3 * math.sqrt(0.25 / REPS) and futile.within == 0, (at_800, futile)


def test_conditional_power_is_the_chance_the_last_look_decides_on_the_trend():
    # No trend at half the information: Z_K ~ N(0, 0.5), so P(|Z_K| > 1.96) = 2 * Phi(-1.96 / sqrt(0.5)).
    assert conditional_power(0.0, 0.5, 1.96) == pytest.approx(2 * NormalDist().cdf(-1.96 / math.sqrt(0.5)))
    assert conditional_power(4.0, 0.5, 1.96) > 0.99 and conditional_power(-4.0, 0.5, 1.96) > 0.99
    with pytest.raises(ValueError, match="information fraction"):
        conditional_power(1.0, 1.0, 1.96)


def test_no_task_stops_for_futility_before_its_share_of_the_cap():
    looks = look_schedule(800, 100)
    on_margin = _diffs(losses=80, gains=40, n=800)  # -0.05 overall, in a shuffled order
    rng = np.random.default_rng(0)
    rng.shuffle(on_margin)
    early = [k for k, n in enumerate(looks) if n / 800 < FUTILITY_FROM]
    for k in early:
        assert decide(on_margin, MARGIN, looks, k, futility=0.99).outcome == "continue"
    first = len(early)
    look = decide(on_margin, MARGIN, looks, first, futility=0.99)
    assert look.outcome == "futile" and 0 <= look.conditional_power < 0.99
    assert "stopped for futility" in explain(look, MARGIN)


def test_a_futility_threshold_outside_0_1_is_refused():
    with pytest.raises(ValueError, match="eval.sequential_futility"):
        decide(np.zeros(200), MARGIN, [100, 200], 1, futility=1.0)


def test_the_report_says_a_task_stopped_for_futility_and_what_would_decide_it():
    from tailor.evaluate.joint import _look_fields
    from tailor.report.evaluation import evaluation_markdown

    looks = look_schedule(800, 100)
    look = decide(_diffs(losses=40, gains=32, n=200), MARGIN, looks, 1, futility=0.99)  # -0.04: near the margin
    assert look.outcome == "futile"

    report = {
        "config": {"promotion": {"max_task_drop": MARGIN}, "eval": {"sequential_block": 100}},
        "eval_limit": 800,
        "evaluation": {
            "sequential": True,
            "stopping": {"hellaswag": {"documents": 200, "reason": "futile", **_look_fields(look)}},
        },
    }
    row = next(line for line in evaluation_markdown(report) if line.startswith("| hellaswag"))
    assert "stopped for futility" in row and f"{look.conditional_power:.0%}" in row
    assert f"about {look.documents_to_decide:,} documents would decide it" in row
