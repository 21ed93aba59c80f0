"""Means, standard deviations and 95% confidence intervals over seeds, and paired differences.

Intervals use Student's t: with the handful of seeds a study can afford, a normal interval would
claim far more certainty than the data hold. A difference whose interval contains zero is called
"within noise"; with one seed there is no interval at all and nothing is concluded.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
from scipy import stats


@dataclass(frozen=True)
class Summary:
    """Mean, SD and 95% CI of ``n`` values (SD and CI are NaN for ``n < 2``)."""

    n: int
    mean: float
    sd: float
    ci_low: float
    ci_high: float

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


def summarize(values: Iterable[float], level: float = 0.95) -> Summary:
    """Mean, sample SD and the t-based confidence interval of the mean.

    NaN values (e.g. a metric a run did not report) are left out.
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
    return Summary(n, mean, sd, mean - half, mean + half)


@dataclass(frozen=True)
class Difference:
    """A paired difference ``a - b`` over the replicates both sides have."""

    name: str
    metric: str
    a: Summary
    b: Summary
    diff: Summary
    pairs: list[str]

    @property
    def verdict(self) -> str:
        """One sentence saying whether the difference holds."""
        d = self.diff
        if d.n < 2:
            return (
                f"only {d.n} paired seed(s): no confidence interval, no conclusion (run more seeds)"
            )
        if d.ci_low <= 0 <= d.ci_high:
            return (
                f"within noise: the 95% CI of the difference [{d.ci_low:+.3f}, "
                f"{d.ci_high:+.3f}] contains 0 ({d.n} seeds)"
            )
        side = "higher" if d.mean > 0 else "lower"
        return (
            f"holds: the first is {side} by {abs(d.mean):.3f} (95% CI [{d.ci_low:+.3f}, "
            f"{d.ci_high:+.3f}], {d.n} seeds)"
        )


def paired(name: str, metric: str, a: Mapping[str, float], b: Mapping[str, float]) -> Difference:
    """Pair ``a`` and ``b`` by replicate (seed) and summarise the differences ``a - b``.

    Args:
        a, b: metric value per replicate id; replicates missing on either side are dropped.
    """
    keys = sorted(set(a) & set(b), key=str)
    keys = [k for k in keys if not (math.isnan(a[k]) or math.isnan(b[k]))]
    return Difference(
        name=name,
        metric=metric,
        a=summarize(a[k] for k in keys),
        b=summarize(b[k] for k in keys),
        diff=summarize(a[k] - b[k] for k in keys),
        pairs=[str(k) for k in keys],
    )
