"""Evaluate until decided: a group-sequential answer to the promotion gate's question per task.

The gate asks, per task, whether the mean paired difference ``delta`` of accuracy (distilled minus
original, over the same documents) lies above ``-margin`` ("within") or below it ("beyond"). Instead
of one interval over a fixed sample of ``eval.limit`` documents, documents are scored in blocks (in
the same order for every model) and the question is asked at each planned look
``block, 2*block, ..., limit``; a task stops at the first look that answers it, or at the cap.

The rule: a group-sequential test with Lan-DeMets alpha spending from the power family ``alpha * t**rho``
(``rho = 3``) at information fraction ``t_k = n_k / n_K``. Each claim is a one-sided test with error
``alpha / 2``: "within" tests ``delta > -margin``, "beyond" ``delta < -margin``. The statistic at look k is
``Z_k = (mean(d) + margin) / (sd / sqrt(n_k))`` (``sd``: see ``interval_sd``); "within" when ``Z_k > c_k``,
"beyond" when ``Z_k < -c_k``. The critical values ``c_1..c_K`` (``critical_values``) are chosen so that,
under the canonical joint distribution of sequential z-statistics (``Z_k = W(t_k) / sqrt(t_k)`` for a
standard Brownian motion ``W``, so ``corr(Z_j, Z_k) = sqrt(t_j / t_k)``), a delta on the margin first crosses
``c`` at look k with probability exactly ``alpha / 2 * (t_k**rho - t_{k-1}**rho)``: each wrong claim has
probability ``alpha / 2`` over the whole plan. They come from the Armitage-McPherson-Rowe recursive
numerical integration (numpy, Simpson's rule), cached per plan. Equivalently, look k reports the interval
``mean(d) +- c_k * sd / sqrt(n_k)`` and decides when it excludes ``-margin``; its ``level`` is that of a
fixed-sample two-sided interval with the same half-width, ``1 - 2 * (1 - Phi(c_k))``. One look is the
fixed-sample 95% interval (``c = 1.96``).

Stopping for futility (``futility`` > 0, non-binding): from the look at ``FUTILITY_FROM`` of the cap on, a
task whose conditional power is below ``futility`` stops without a claim ("futile"), as a task at the cap
does. Conditional power is the probability that the last look decides either way if the observed trend
continues: with ``Z_k`` at information ``t_k`` and drift ``theta = Z_k / sqrt(t_k)``, ``Z_K`` is
``N(theta, 1 - t_k)``, so it is ``P(Z_K > c_K) + P(Z_K < -c_K)`` (Lan, Simon and Halperin's stochastic
curtailment). Stopping without a claim can only remove paths that might have made a claim, so neither
wrong claim's probability rises above its ``alpha / 2``; what futility costs is power, which the simulation
reports beside the documents it saves.

The Brownian-motion model is exact for normal increments with a known sd; here the sd is estimated at
each look and the differences are in {-1, 0, 1}, so the realised error is checked by simulation
(``simulate``; ``python -m tailor.evaluate.sequential [--reps N]`` prints the tables).

Pure functions and frozen dataclasses, no I/O: an evaluation calls ``decide`` look by look, the
simulation calls ``run_until_decided`` on whole synthetic samples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from statistics import NormalDist
from typing import Literal

import numpy as np

RHO = 3.0
"""Power of the spending function ``alpha * t**rho``. 3 approximates O'Brien-Fleming: early looks, where a
normal interval over few documents is least trustworthy, spend almost nothing and stop only clear
cases, and most of alpha is left for the cap, so a task that runs to ``eval.limit`` is judged at a
level close to the fixed-sample 95% (c = 2.05 instead of 1.96 with five looks, 2.08 with eight). A
smaller rho stops more tasks early at the cost of a wider interval at the cap."""

ALPHA = 0.05
"""Two-sided error of the whole procedure: matches the gate's fixed-sample 95% intervals."""

FUTILITY_FROM = 0.25
"""Share of the cap before which no task stops for futility: at the first looks the observed trend rests on
too few documents to give up on (a clear difference can look marginal over the first hundred)."""

Outcome = Literal["within", "beyond", "continue", "cap", "futile"]


@dataclass(frozen=True)
class SequentialLook:
    """The gate's question asked after ``n`` documents (look ``look_index`` of a plan ending at ``limit``).

    ``outcome``: "within" (``ci_low > -margin``), "beyond" (``ci_high < -margin``), "continue" (undecided,
    more looks planned), "cap" (undecided at the last look) or "futile" (undecided, and the last look would
    decide with conditional power below the rule's ``futility``). When undecided at a stop,
    ``documents_to_decide`` estimates how many documents a fixed-sample interval at the last look's level
    would need to exclude ``-margin`` if ``delta`` and the sd stayed as observed (None when ``delta`` sits on
    ``-margin``); ``conditional_power`` is the futility rule's figure where it was asked."""

    n: int
    delta: float
    ci_low: float
    ci_high: float
    level: float
    """The two-sided level of a fixed-sample interval as wide as this look's, ``1 - 2 * (1 - Phi(c_k))`` for
    the look's critical value ``c_k``: the interval's own nominal coverage, above the plan's 95% at every
    look but one-look plans (the plan as a whole is wrong at most ``alpha / 2`` per side, not each look)."""
    outcome: Outcome
    look_index: int
    limit: int
    documents_to_decide: int | None = None
    conditional_power: float | None = None

    @property
    def decided(self) -> bool:
        return self.outcome in ("within", "beyond")


def look_schedule(limit: int | None, block: int) -> list[int]:
    """Document counts at which to look: ``block, 2*block, ...`` and exactly ``limit`` last (one look when
    ``limit <= block``). The plan is fixed before any document is scored: the error bound holds only for
    looks chosen without seeing the data. ``limit`` is the task's cap (``eval.limit``, or the task's
    document count when that is smaller)."""
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise ValueError(f"eval.sequential_block must be an integer >= 1 (got {block!r})")
    if limit is None:
        raise ValueError("eval.sequential needs a finite eval.limit: the cap the looks are planned up to")
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(f"eval.limit must be an integer >= 1 (got {limit!r})")
    return [*range(block, limit, block), limit]


def spending(looks: list[int], alpha: float = ALPHA, rho: float = RHO) -> list[float]:
    """Each look's share ``alpha_k`` of the two-sided error: ``alpha * (t_k**rho - t_{k-1}**rho)``; each
    one-sided claim spends half of it (``critical_values``)."""
    _check_plan(looks, alpha, rho)
    total = looks[-1]
    spent = [alpha * (n / total) ** rho for n in looks]
    # The last share is alpha minus the rest, so float rounding cannot make the shares sum past alpha.
    spent[-1] = alpha
    return [spent[0], *(b - a for a, b in zip(spent, spent[1:]))]


def critical_values(looks: list[int], alpha: float = ALPHA, rho: float = RHO) -> tuple[float, ...]:
    """The group-sequential boundary ``c_1..c_K`` of each one-sided claim (Lan-DeMets, power-family spending).

    For a standard Brownian motion ``W`` and ``Z_k = W(t_k) / sqrt(t_k)``, ``t_k = n_k / n_K``, ``c_k`` is the
    value for which ``P(Z_j <= c_j for j < k, Z_k > c_k)`` equals look k's one-sided share ``alpha_k / 2``
    (``spending``), so ``P(some Z_k > c_k) = alpha / 2``; the other claim's boundary is ``-c_k`` by symmetry.
    Each side is solved alone, as if the other claim never stopped a task: a task stopped by the other
    claim cannot go on to a wrong one, so this can only lower each wrong claim's probability.
    ``c_1`` is the normal quantile of ``1 - alpha_1 / 2``, and one look gives ``1.96`` at alpha 0.05. The
    rest are solved look by look from the density of ``W(t_k)`` on the paths not yet stopped, by the
    recursive numerical integration of Armitage, McPherson and Rowe (1969) (Jennison and Turnbull 2000,
    ch. 19): accurate to about 1e-6 in ``c`` (the spent alpha to about 1e-7), a few milliseconds for 8
    looks, cached per plan."""
    _check_plan(looks, alpha, rho)
    return _critical_values(tuple(int(n) for n in looks), float(alpha), float(rho))


_POINTS_PER_SD = 8
"""Simpson grid points per sd of the shortest step between looks: converged, ``c`` moves < 1e-6 at 32."""

_TAILS = 9.0
"""Sds past which a normal density or tail is treated as 0 (``exp(-40) < 1e-17``)."""

_BAND = 128
"""New grid points per kernel product: the Gaussian kernel reaches ``_TAILS`` sds, so only a band of the old
grid is multiplied, and a plan with hundreds of looks stays quick."""


@lru_cache(maxsize=256)
def _critical_values(looks: tuple[int, ...], alpha: float, rho: float) -> tuple[float, ...]:
    shares = spending(list(looks), alpha, rho)
    t = [n / looks[-1] for n in looks]
    steps = [math.sqrt(b - a) for a, b in zip([0.0, *t], t)]  # sd of W's increment between looks
    normal = NormalDist()
    c = [normal.inv_cdf(1.0 - shares[0] / 2.0)]
    x = wf = np.empty(0)
    for k in range(1, len(looks)):
        # The sub-density of W(t_{k-1}) on the paths still running, on a grid up to its boundary.
        top = c[-1] * math.sqrt(t[k - 1])
        h = min(steps[k - 1], steps[k]) / _POINTS_PER_SD
        grid, weights = _simpson(-_TAILS * math.sqrt(t[k - 1]), top, h)
        if k == 1:
            density = np.exp(-0.5 * grid * grid / t[0]) / math.sqrt(2 * math.pi * t[0])
        else:
            density = _convolved(grid, x, wf, steps[k - 1])
        x, wf = grid, weights * density
        b = _solve_boundary(x, wf, steps[k], shares[k] / 2.0, normal.inv_cdf(1.0 - shares[k] / 2.0) * math.sqrt(t[k]))
        c.append(b / math.sqrt(t[k]))
    return tuple(c)


def _simpson(low: float, high: float, h: float) -> tuple[np.ndarray, np.ndarray]:
    """Points and composite Simpson weights on ``[low, high]`` with spacing at most ``h``."""
    cells = max(2, 2 * math.ceil((high - low) / (2 * h)))
    points = np.linspace(low, high, cells + 1)
    weights = np.full(cells + 1, 2.0)
    weights[1::2] = 4.0
    weights[0] = weights[-1] = 1.0
    return points, weights * ((high - low) / cells / 3.0)


def _convolved(y: np.ndarray, x: np.ndarray, wf: np.ndarray, sd: float) -> np.ndarray:
    """The density at ``y`` of ``X + N(0, sd**2)``, ``X`` the sub-density given as weights ``wf`` at sorted ``x``."""
    out = np.empty_like(y)
    reach = _TAILS * sd
    for start in range(0, len(y), _BAND):
        part = y[start : start + _BAND]
        lo, hi = np.searchsorted(x, part[0] - reach), np.searchsorted(x, part[-1] + reach, side="right")
        z = (part[:, None] - x[None, lo:hi]) / sd
        out[start : start + _BAND] = np.exp(-0.5 * z * z) @ wf[lo:hi]
    return out / (sd * math.sqrt(2 * math.pi))


_ERFC = np.frompyfunc(math.erfc, 1, 1)


def _solve_boundary(x: np.ndarray, wf: np.ndarray, sd: float, target: float, guess: float) -> float:
    """The ``b`` at which paths still running (weights ``wf`` at ``x``) end above ``b`` after a ``N(0, sd**2)``
    step with probability ``target``: Newton on ``log P(b)`` (decreasing in ``b``), kept inside a bracket."""
    beyond = np.concatenate([np.cumsum(wf[::-1])[::-1], [0.0]])  # beyond[i] = sum(wf[i:])
    reach = _TAILS * sd

    def crossing(b: float) -> tuple[float, float]:
        lo, hi = np.searchsorted(x, b - reach), np.searchsorted(x, b + reach, side="right")
        z = (b - x[lo:hi]) / sd
        tail = _ERFC(z / math.sqrt(2.0)).astype(np.float64) / 2.0
        density = float(wf[lo:hi] @ np.exp(-0.5 * z * z)) / (sd * math.sqrt(2 * math.pi))
        return float(wf[lo:hi] @ tail) + float(beyond[hi]), density

    low, high = float(x[0]) - reach, float(x[-1]) + reach
    b = min(max(guess, low), high)
    for _ in range(200):
        p, density = crossing(b)
        if p > target:
            low = b
        else:
            high = b
        gap = math.log(p / target) if p > 0 else -math.inf
        if abs(gap) < 1e-12 or high - low < 1e-12:
            break
        step = b + gap * p / density if p > 0 and density > 0 else math.nan  # d log P / db = -density / p
        b = step if low < step < high else (low + high) / 2
    return b


def margin_sd(losses: int, gains: int, n: int, margin: float) -> float:
    """The sd of one paired difference if the truth sat exactly on the margin (``delta = -margin``), fitted
    to the sample: the restricted maximum-likelihood ``P(-1) = q``, ``P(+1) = q - margin`` given ``losses``
    documents at -1 and ``gains`` at +1 among ``n`` (the null variance of the score test for paired
    proportions, Nam 1997 / Tango 1998). Its variance ``2q - margin - margin**2`` is at least
    ``margin * (1 - margin)``: a difference of ``-margin`` needs a discordant share of at least ``margin``.

    Why not the sample sd alone: a wrong claim comes from a sample that happens to look better (or worse)
    than the truth, and with few discordant documents such a sample also has a smaller sd, so a plain
    ``mean +- z * sd`` interval misses on that side more often than its level says, worst at the early
    looks' small shares of alpha (measured: at 10% discordance, a first look at 100 documents claimed
    "within" about 6 times as often as its share allowed). The margin's own sd does not shrink with the sample's
    luck."""
    s = -margin
    b, c = losses, gains
    # Setting d(log-likelihood)/dq to 0 gives 2n q^2 - slope q + constant = 0; its roots and the ends of the
    # feasible range are the only candidates, so no iterative optimiser (and no tolerance) is needed.
    slope = b * (1 - 3 * s) + c * (1 - s) - 2 * s * (n - b - c)
    constant = -b * s * (1 - s)
    root = math.sqrt(max(slope * slope - 8 * n * constant, 0.0))
    low, high = margin, (1 + margin) / 2  # P(+1) = q - margin >= 0 and P(0) = 1 - 2q + margin >= 0
    candidates = [low, high, (slope - root) / (4 * n), (slope + root) / (4 * n)]
    q = max((x for x in candidates if low <= x <= high), key=lambda x: _log_likelihood(x, s, b, c, n))
    return math.sqrt(max(2 * q + s - s * s, 0.0))


def _log_likelihood(q: float, s: float, losses: int, gains: int, n: int) -> float:
    total = 0.0
    for count, p in ((losses, q), (gains, q + s), (n - losses - gains, 1 - 2 * q - s)):
        if count:
            total += count * math.log(p) if p > 0 else -math.inf
    return total


def interval_sd(losses: int, gains: int, n: int, margin: float) -> float:
    """The sd an interval over ``n`` paired differences (``losses`` at -1, ``gains`` at +1) uses: the
    largest of the sample sd (ddof=1), the margin's sd (``margin_sd``) and the sd of one discordant
    document among ``n`` (``1/sqrt(n)``, so that one document, or all-equal differences with no margin to
    lean on, never decide). Taking the largest keeps each look at least as cautious as both the plain
    interval and the score test."""
    mean = (gains - losses) / n
    sample = math.sqrt(max(losses + gains - n * mean * mean, 0.0) / (n - 1)) if n > 1 else 0.0
    return max(sample, margin_sd(losses, gains, n, margin), 1.0 / math.sqrt(n))


def decide(
    diffs: np.ndarray,
    margin: float,
    looks: list[int],
    look_index: int,
    alpha: float = ALPHA,
    rho: float = RHO,
    futility: float = 0.0,
) -> SequentialLook:
    """The gate's question at look ``look_index``, over the first ``looks[look_index]`` paired differences.

    ``diffs`` holds the paired differences (distilled minus original, per document, in the plan's
    document order); it may be longer than this look's count, the rest is not read. ``futility``: the
    conditional power below which an undecided task stops (0 = never for futility)."""
    _check_margin(margin)
    _check_futility(futility)
    bounds = critical_values(looks, alpha, rho)
    if not 0 <= look_index < len(looks):
        raise ValueError(f"look_index {look_index} outside the plan's {len(looks)} looks")
    d = _checked(diffs, looks[look_index])
    return _look(int(np.sum(d < 0)), int(np.sum(d > 0)), margin, looks, look_index, bounds, futility)


def run_until_decided(
    diffs: np.ndarray, margin: float, looks: list[int], alpha: float = ALPHA, rho: float = RHO, futility: float = 0.0
) -> SequentialLook:
    """The whole procedure over one array of paired differences: looks at ``diffs[:n_k]`` in turn and
    returns the first look that stops (decided, futile or the cap). The same decisions as ``decide``."""
    _check_margin(margin)
    _check_futility(futility)
    bounds = critical_values(looks, alpha, rho)
    d = _checked(diffs, looks[-1])
    # Counts per prefix in one pass: the simulation runs thousands of these.
    losses, gains = np.cumsum(d < 0), np.cumsum(d > 0)
    for k, n in enumerate(looks):
        look = _look(int(losses[n - 1]), int(gains[n - 1]), margin, looks, k, bounds, futility)
        if look.outcome != "continue":
            return look
    raise AssertionError("the last look is never 'continue'")


def _look(
    losses: int,
    gains: int,
    margin: float,
    looks: list[int],
    look_index: int,
    bounds: tuple[float, ...],
    futility: float = 0.0,
) -> SequentialLook:
    n = looks[look_index]
    delta = (gains - losses) / n
    sd = interval_sd(losses, gains, n, margin)
    z = bounds[look_index]
    half = z * sd / math.sqrt(n)
    low, high = delta - half, delta + half
    needed = power = None
    t = n / looks[-1]
    if low > -margin:
        outcome: Outcome = "within"
    elif high < -margin:
        outcome = "beyond"
    elif look_index == len(looks) - 1:
        outcome = "cap"
        needed = documents_to_decide(delta, sd, margin, bounds[-1], n)
    elif futility > 0 and t >= FUTILITY_FROM:
        power = conditional_power((delta + margin) / (sd / math.sqrt(n)), t, bounds[-1])
        outcome = "futile" if power < futility else "continue"
        if outcome == "futile":
            needed = documents_to_decide(delta, sd, margin, bounds[-1], n)
    else:
        outcome = "continue"
    return SequentialLook(
        n=n,
        delta=delta,
        ci_low=low,
        ci_high=high,
        level=1.0 - 2.0 * NormalDist().cdf(-z),
        outcome=outcome,
        look_index=look_index,
        limit=looks[-1],
        documents_to_decide=needed,
        conditional_power=power,
    )


def conditional_power(z: float, t: float, last_bound: float) -> float:
    """Probability that the last look decides (``|Z_K| > last_bound``) if the drift seen so far goes on:
    ``Z_K ~ N(z / sqrt(t), 1 - t)`` given ``Z = z`` at information fraction ``t`` (0 < t < 1)."""
    if not 0 < t < 1:
        raise ValueError(f"conditional power needs an information fraction in (0, 1) (got {t})")
    normal, drift, spread = NormalDist(), z / math.sqrt(t), math.sqrt(1 - t)
    return normal.cdf((drift - last_bound) / spread) + normal.cdf((-last_bound - drift) / spread)


def _checked(diffs: np.ndarray, n: int) -> np.ndarray:
    d = np.asarray(diffs, dtype=np.float64)
    if d.ndim != 1:
        raise ValueError(f"paired differences must be one-dimensional (got shape {d.shape})")
    if len(d) < n:
        raise ValueError(f"the look at {n} documents needs {n} paired differences, got {len(d)}")
    d = d[:n]
    if not np.all((d == -1) | (d == 0) | (d == 1)):
        raise ValueError("paired differences must be per-document accuracy differences in {-1, 0, 1}")
    return d


def documents_to_decide(delta: float, sd: float, margin: float, z: float, n: int) -> int | None:
    """Documents at which ``delta +- z * sd / sqrt(N)`` would just exclude ``-margin``:
    ``(z * sd / |delta + margin|)**2``, the same estimate the fixed-sample gate prints (at least ``n + 1``).

    A point estimate, not a promise: with ``delta`` and ``sd`` as observed it is where the interval's edge
    reaches the margin, so a fresh sample of that size decides only about half the time. None when
    ``delta`` sits on the margin (no finite sample decides it)."""
    distance = abs(delta + margin)
    if distance < 1e-12:
        return None
    return max(n + 1, math.ceil((z * sd / distance) ** 2))


def explain(look: SequentialLook, margin: float) -> str:
    """One report line: how many documents were used and why the task stopped."""
    shown = f"{look.delta:+.4f} [{look.ci_low:+.3f}, {look.ci_high:+.3f}] at {look.level:.2%}"
    used = f"{look.n} of {look.limit} documents"
    if look.outcome == "within":
        return f"stopped after {used}: {shown} shown within -{margin}"
    if look.outcome == "beyond":
        return f"stopped after {used}: {shown} shown beyond -{margin}"
    if look.outcome == "continue":
        return f"undecided after {used}: {shown} holds -{margin}, continuing"
    needed = (
        f"about {look.documents_to_decide:,} documents would decide it"
        if look.documents_to_decide is not None
        else "the change sits on the margin, no sample size decides it"
    )
    if look.outcome == "futile":
        return (
            f"stopped for futility after {used}: {shown} holds -{margin}, and the cap would decide it with "
            f"probability {look.conditional_power:.0%} at this trend ({needed})"
        )
    return f"stopped at the cap, {used}: {shown} holds -{margin} ({needed})"


@dataclass(frozen=True)
class SimulationRow:
    """Realised behaviour of the rule over ``reps`` synthetic paired samples with a known true ``delta``."""

    delta: float
    discordance: float
    reps: int
    within: float
    beyond: float
    cap: float
    """Share stopped undecided: at the cap or, with a futility rule, for futility."""
    mean_documents: float
    wrong: float
    """Rate of the wrong claim: "within" when ``delta < -margin``, "beyond" when ``delta > -margin``, the
    larger of the two when ``delta`` is on the margin (where both are wrong, each bounded by alpha/2)."""


def synthetic_diffs(delta: float, discordance: float, size: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Paired differences in {-1, 0, 1} with mean ``delta``: ``P(+1) - P(-1) = delta``, ``P(+1) + P(-1) =
    discordance`` (the share of documents the two models answer differently)."""
    if not abs(delta) <= discordance <= 1:
        raise ValueError(f"discordance {discordance} must lie in [|delta|, 1] = [{abs(delta)}, 1]")
    p_plus, p_minus = (discordance + delta) / 2, (discordance - delta) / 2
    u = rng.random(size)
    return np.where(u < p_minus, -1.0, np.where(u < p_minus + p_plus, 1.0, 0.0))


def simulate(
    delta: float,
    discordance: float,
    margin: float = 0.05,
    limit: int = 500,
    block: int = 100,
    reps: int = 2000,
    alpha: float = ALPHA,
    rho: float = RHO,
    seed: int = 0,
    futility: float = 0.0,
) -> SimulationRow:
    """Run the rule on ``reps`` synthetic samples of true mean ``delta`` and count its outcomes."""
    looks = look_schedule(limit, block)
    samples = synthetic_diffs(delta, discordance, (reps, limit), np.random.default_rng(seed))
    stops = [run_until_decided(s, margin, looks, alpha, rho, futility) for s in samples]
    rate = {o: sum(s.outcome == o for s in stops) / reps for o in ("within", "beyond")}
    rate["cap"] = 1.0 - rate["within"] - rate["beyond"]
    # Exact float comparison on purpose: callers pass -margin itself for "on the margin".
    if delta < -margin:
        wrong = rate["within"]
    elif delta > -margin:
        wrong = rate["beyond"]
    else:
        wrong = max(rate["within"], rate["beyond"])
    return SimulationRow(
        delta=delta,
        discordance=discordance,
        reps=reps,
        within=rate["within"],
        beyond=rate["beyond"],
        cap=rate["cap"],
        mean_documents=float(np.mean([s.n for s in stops])),
        wrong=wrong,
    )


def simulation_table(
    margin: float = 0.05,
    limit: int = 500,
    block: int = 100,
    discordances: tuple[float, ...] = (0.15, 0.3),
    reps: int = 2000,
    alpha: float = ALPHA,
    deltas: tuple[float, ...] | None = None,
    futility: float = 0.0,
) -> str:
    """The simulation as a text table, for quoting: per true delta, the realised rates and mean documents.
    ``deltas`` defaults to ``-margin - 0.04, -margin, -margin + 0.02, 0``."""
    if deltas is None:
        deltas = (-margin - 0.04, -margin, -margin + 0.02, 0.0)
    looks = look_schedule(limit, block)
    lines = [
        f"margin {margin}, looks {looks}, alpha {alpha} (each wrong claim <= {alpha / 2}), "
        f"rho {RHO}, {reps} replications",
        "boundaries c_k: " + " ".join(f"{c:.3f}" for c in critical_values(looks, alpha)),
        f"futility: {'stop below conditional power ' + str(futility) if futility else 'off'}",
        f"{'delta':>7} {'discord':>7} {'within':>7} {'beyond':>7} {'undecid':>7} {'wrong':>7} {'mean docs':>9}",
    ]
    cases = [(d, r) for r in discordances for d in deltas]
    # A one-sided pruned model (every discordant document lost) on the margin: the fewest discordances a
    # difference of -margin allows, where the margin's sd matters most.
    cases.append((-margin, margin))
    for seed, (delta, discordance) in enumerate(cases):
        row = simulate(delta, discordance, margin, limit, block, reps, alpha, seed=seed, futility=futility)
        lines.append(
            f"{row.delta:>+7.3f} {row.discordance:>7.2f} {row.within:>7.4f} {row.beyond:>7.4f} {row.cap:>7.4f} "
            f"{row.wrong:>7.4f} {row.mean_documents:>9.1f}"
        )
    return "\n".join(lines)


def _check_margin(margin: float) -> None:
    if not 0 <= margin <= 1:
        raise ValueError(f"promotion.max_task_drop must lie in [0, 1] (got {margin})")


def _check_futility(futility: float) -> None:
    if not 0 <= futility < 1:
        raise ValueError(f"eval.sequential_futility must lie in [0, 1) (got {futility})")


def _check_plan(looks: list[int], alpha: float, rho: float) -> None:
    if not looks:
        raise ValueError("the look schedule is empty")
    if any(isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1 for n in looks):
        raise ValueError(f"looks must be document counts >= 1 (got {looks})")
    if any(b <= a for a, b in zip(looks, looks[1:])):
        raise ValueError(f"looks must increase strictly (got {looks})")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must lie in (0, 1) (got {alpha})")
    if not rho > 0:
        raise ValueError(f"rho must be > 0 (got {rho})")


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="The sequential rule's realised error rates and power by simulation.")
    parser.add_argument("--reps", type=int, default=2000, help="synthetic samples per row (docs quote 20000)")
    reps = parser.parse_args().reps
    # The error check's plan; power at eval.limit 800 around the margin; a longer plan (clear cases, how soon).
    print(simulation_table(reps=reps))
    print()
    print(
        simulation_table(limit=800, block=100, discordances=(0.2, 0.3), reps=reps, deltas=(-0.092, -0.044, -0.01, 0.0))
    )
    print()
    print(simulation_table(limit=2000, block=250, reps=reps))
    print()
    # The quick profile's plan: a higher cap, and stopping for futility below 10% conditional power.
    print(
        simulation_table(
            limit=1200,
            block=150,
            discordances=(0.2, 0.3),
            reps=reps,
            deltas=(-0.092, -0.044, -0.01, 0.0),
            futility=0.1,
        )
    )
