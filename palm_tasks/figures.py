"""Figures printed to the precision their standard error supports: the digits beyond the se's
first significant one are noise, and printing them suggests a precision the run does not have."""

from __future__ import annotations

import math


def decimals(se: float, most: int = 6) -> int:
    """Decimals up to the se's first significant digit (at least 2, at most `most`)."""
    if not (se > 0 and math.isfinite(se)):
        return 3
    return int(min(most, max(2, -math.floor(math.log10(se)))))


def with_se(value: float, se: float) -> str:
    """'0.152 ± 0.032': the value and its se, both to the se's first significant digit."""
    n = decimals(se)
    return f"{value:.{n}f} ± {se:.{n}f}"


def at_precision(value: float, se: float) -> str:
    """The value alone, to the se's first significant digit."""
    return f"{value:.{decimals(se)}f}"
