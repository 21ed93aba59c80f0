"""Means, standard deviations and 95% confidence intervals over seeds, paired differences, and
the decision each difference supports.

Intervals use Student's t: with the handful of seeds a study can afford, a normal interval would
claim far more certainty than the data hold. An interval is cut to the range its metric can take
(a Dice lies in [0, 1], a difference of Dice in [-1, 1], a loss is >= 0), so that it never claims
values that cannot occur.

A paired difference gets one of these decisions:

- ``holds``: its 95% CI excludes 0;
- ``equivalent``: its 95% CI lies inside ``±margin`` (0.01 by default): any difference is too
  small to matter (two one-sided tests at 2.5% each);
- ``undecided``: neither; more seeds (or less noisy runs) would be needed;
- ``identical``: every pair of runs gave exactly the same value (one pair is enough), so there
  is nothing to estimate (for instance patience arms where no run stopped early);
- ``too few seeds``: fewer than :data:`MIN_SEEDS` pairs, where a t interval is too wide to
  decide anything (with 2 pairs its half-width is 12.7 standard errors).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
from scipy import stats

MARGIN = 0.01
"""Equivalence margin of a difference, in the metric's units (mean Dice: 0.01)."""

MIN_SEEDS = 3
"""Fewest paired seeds for a decision (below, the difference is reported but not decided)."""

DECISIONS = ("holds", "equivalent", "undecided", "identical", "too few seeds")

_BOUNDED = (0.0, 1.0)
_NON_NEGATIVE = (0.0, math.inf)


def metric_range(metric: str) -> tuple[float, float]:
    """The values a metric can take: Dice in [0, 1]; losses, errors, distances and step counts
    >= 0; anything else unbounded."""
    m = metric.lower()
    if "dice" in m:
        return _BOUNDED
    if any(k in m for k in ("loss", "mse", "mae", "hd95", "steps", "best_step", "avd")):
        return _NON_NEGATIVE
    return (-math.inf, math.inf)


def difference_range(metric: str) -> tuple[float, float]:
    """The values a difference of two values of ``metric`` can take."""
    lo, hi = metric_range(metric)
    return (lo - hi, hi - lo)


@dataclass(frozen=True)
class Summary:
    """Mean, SD and 95% CI of ``n`` values (SD and CI are NaN for ``n < 2``)."""

    n: int
    mean: float
    sd: float
    ci_low: float
    ci_high: float

    @property
    def half_width(self) -> float:
        """Half the width of the interval (NaN without one)."""
        return (self.ci_high - self.ci_low) / 2

    def text(self, digits: int = 3) -> str:
        """``mean ± SD [low, high]``, or the mean alone for one value."""
        if self.n == 0:
            return "–"
        if self.n < 2 or math.isnan(self.sd) or self.sd == 0:
            return f"{self.mean:.{digits}f}"  # one value, or every seed agrees
        return (
            f"{self.mean:.{digits}f} ± {self.sd:.{digits}f} "
            f"[{self.ci_low:.{digits}f}, {self.ci_high:.{digits}f}]"
        )


def summarize(
    values: Iterable[float],
    level: float = 0.95,
    bounds: tuple[float, float] = (-math.inf, math.inf),
) -> Summary:
    """Mean, sample SD and the t-based confidence interval of the mean.

    NaN values (e.g. a metric a run did not report) are left out.

    Args:
        values: one value per replicate.
        level: coverage of the interval.
        bounds: the range the quantity can take (see :func:`metric_range`); the interval is
            cut to it.
    """
    x = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    n = len(x)
    if n == 0:
        nan = float("nan")
        return Summary(0, nan, nan, nan, nan)
    mean = float(x.mean())
    if n < 2:
        nan = float("nan")
        return Summary(1, mean, nan, nan, nan)
    sd = float(x.std(ddof=1))
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
    lo, hi = bounds
    return Summary(n, mean, sd, max(lo, mean - half), min(hi, mean + half))


@dataclass(frozen=True)
class Difference:
    """A paired difference ``a - b`` over the replicates both sides have."""

    name: str
    metric: str
    a: Summary
    b: Summary
    diff: Summary
    pairs: list[str]
    margin: float = MARGIN

    @property
    def decision(self) -> str:
        """One of :data:`DECISIONS` (see the module docstring)."""
        d = self.diff
        if d.n >= 1 and d.mean == 0 and (d.n == 1 or d.sd == 0):  # exactly equal runs
            return "identical"
        if d.n < MIN_SEEDS:
            return "too few seeds"
        if d.ci_low > 0 or d.ci_high < 0:
            return "holds"
        if -self.margin <= d.ci_low and d.ci_high <= self.margin:
            return "equivalent"
        return "undecided"

    @property
    def decided(self) -> bool:
        """Whether the difference is decided: it holds, or the sides are equivalent."""
        return self.decision in ("holds", "equivalent")

    def interval(self) -> str:
        """``+0.012 [+0.004, +0.020]``: the mean difference and its 95% CI."""
        d = self.diff
        if d.n == 0:
            return "–"
        if d.n < 2 or math.isnan(d.sd):
            return f"{d.mean:+.3f} (no interval)"
        return f"{d.mean:+.3f} [{d.ci_low:+.3f}, {d.ci_high:+.3f}]"

    @property
    def verdict(self) -> str:
        """One sentence: the decision, in words, with the interval it rests on."""
        d, decision = self.diff, self.decision
        if d.n == 0:
            return "no paired runs yet: nothing to compare"
        if decision == "identical":
            pairs = "the one pair" if d.n == 1 else f"every one of the {d.n} pairs"
            return (
                f"identical: {pairs} gave the same value (the runs did not differ), so there "
                "is nothing to estimate"
            )
        if decision == "too few seeds" and d.n == 1:
            return (
                f"too few seeds: one seed decides nothing ({d.mean:+.3f} between two single runs)"
            )
        if decision == "too few seeds":
            return (
                f"too few seeds for a decision: {d.n} pair(s), {MIN_SEEDS} needed; "
                f"difference {self.interval()}"
            )
        ci = f"95% CI [{d.ci_low:+.3f}, {d.ci_high:+.3f}], {d.n} seeds"
        if decision == "holds":
            side = "higher" if d.mean > 0 else "lower"
            return f"holds: the first is {side} by {abs(d.mean):.3f} ({ci})"
        if decision == "equivalent":
            return f"equivalent within ±{self.margin:g}: {d.mean:+.3f} ({ci})"
        return (
            f"undecided: the CI contains 0 but reaches beyond ±{self.margin:g} "
            f"({d.mean:+.3f}, {ci})"
        )


def paired(
    name: str,
    metric: str,
    a: Mapping[str, float],
    b: Mapping[str, float],
    margin: float = MARGIN,
) -> Difference:
    """Pair ``a`` and ``b`` by replicate (seed) and summarise the differences ``a - b``.

    Args:
        a, b: metric value per replicate id; replicates missing on either side are dropped.
        margin: equivalence margin, in the metric's units.
    """
    keys = sorted(set(a) & set(b), key=str)
    keys = [k for k in keys if not (math.isnan(a[k]) or math.isnan(b[k]))]
    bounds = metric_range(metric)
    return Difference(
        name=name,
        metric=metric,
        a=summarize((a[k] for k in keys), bounds=bounds),
        b=summarize((b[k] for k in keys), bounds=bounds),
        diff=summarize((a[k] - b[k] for k in keys), bounds=difference_range(metric)),
        pairs=[str(k) for k in keys],
        margin=margin,
    )


def multiple_comparisons_note(diffs: list[Difference], level: float = 0.95) -> str:
    """Words on reading many intervals at once: how many 'holds' chance alone would give, and
    which still hold at the Bonferroni level (each CI at ``1 - 0.05 / m``)."""
    tested = [d for d in diffs if d.diff.n >= MIN_SEEDS and d.decision != "identical"]
    m = len(tested)
    if m < 2:
        return ""
    alpha = 1 - level
    strict = []
    for d in tested:
        t = float(stats.t.ppf(1 - alpha / (2 * m), d.diff.n - 1))
        half = t * d.diff.sd / math.sqrt(d.diff.n)
        if abs(d.diff.mean) > half:
            strict.append(d.name)
    return (
        f"Multiple comparisons: {m} intervals are read together, each at {level:.0%}; if no "
        f"difference were real, about {alpha * m:.1f} of them would still exclude 0 by chance. "
        f"At the Bonferroni level ({1 - alpha / m:.2%} intervals) "
        + (
            f"{len(strict)} still hold{'s' if len(strict) == 1 else ''}: " + "; ".join(strict) + "."
            if strict
            else "none holds."
        )
    )
