"""How sure a number is: the change between two scores with its 95% interval, and whether that interval says the
change is noise. Pure Python: `runner diff` uses it on per-example scores (paired, when both sides scored the same
examples) or on two means and their stderr."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

Z95 = 1.959963984540054  # the normal distribution's two-sided 95% quantile


@dataclass(frozen=True)
class Change:
    """B - A over `n` examples, with the standard error of that difference."""

    n: int
    delta: float
    se: float
    paired: bool  # from per-example differences on the same examples (tighter), or from two stderrs

    @property
    def low(self) -> float:
        return self.delta - Z95 * self.se

    @property
    def high(self) -> float:
        return self.delta + Z95 * self.se

    @property
    def within_noise(self) -> bool:
        """The 95% interval holds 0: this change is not told apart from chance."""
        return self.low <= 0 <= self.high

    def as_dict(self) -> dict[str, float | int | bool]:
        return {
            "n": self.n,
            "delta": self.delta,
            "se": self.se,
            "low": self.low,
            "high": self.high,
            "paired": self.paired,
            "within_noise": self.within_noise,
        }


def paired(a: dict[int, float], b: dict[int, float]) -> Change | None:
    """B - A on the examples both scored (by id): the mean per-example difference and its standard error
    (sample standard deviation / sqrt(n)). None when fewer than two examples are shared."""
    common = sorted(set(a) & set(b))
    if len(common) < 2:
        return None
    d = [b[i] - a[i] for i in common]
    return Change(len(common), statistics.fmean(d), statistics.stdev(d) / math.sqrt(len(d)), True)


def unpaired(a: float, se_a: float, b: float, se_b: float, n: int) -> Change:
    """B - A from two independent means and their standard errors."""
    return Change(n, b - a, math.hypot(se_a, se_b), False)
