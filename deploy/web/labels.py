"""Labels a person reads, for the live view (and any chart that wants them): numbers with
thousands separators and no exponent for ordinary magnitudes, times as UTC dates and times.

- :func:`number_label`: ``33760`` → ``33,760``; ``21.4371`` → ``21.44``; ``0.0012345`` →
  ``0.001235``. Without ``step``, four significant digits and no trailing zeros (whole numbers
  from 1,000 on); with ``step`` (the spacing of the axis ticks), as many decimals as that
  spacing needs plus one, the same for every tick. Plain digits for every magnitude from 1e-4 up
  to 1e12; beyond that (or for steps finer than 1e-9) the ``1.23e+15`` form. Not finite: ``-``.
- :func:`time_label`: epoch seconds → ``2026-11-26 15:00`` (``15:00:05`` when the span shown is
  under ten minutes), always UTC.

Pure functions, no dependencies: the server formats, the page's script only copies text.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime

PLAIN_MIN = 1e-4  # smallest non-zero magnitude written without an exponent
PLAIN_MAX = 1e12  # magnitudes from here on are written with one
MAX_DECIMALS = 9


def number_label(value: float, step: float | None = None) -> str:
    """``value`` as an axis or table label (see the module docstring)."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        return "-"
    if not math.isfinite(v):
        return "-"
    a = abs(v)
    if step is not None and math.isfinite(step) and step > 0:
        decimals = 1 - math.floor(math.log10(step))
        if a >= PLAIN_MAX or decimals > MAX_DECIMALS:
            return f"{v:.3g}"
        text = f"{v:,.{max(0, decimals)}f}"
    else:
        if a == 0:
            return "0"
        if a >= PLAIN_MAX or a < PLAIN_MIN:
            return f"{v:.3g}"
        decimals = max(0, 3 - math.floor(math.log10(a)))
        text = f"{v:,.{decimals}f}"
        if "." in text:
            text = text.rstrip("0").rstrip(".")
    if text.startswith("-") and text.strip("-0.,") == "":
        text = text[1:]  # no "-0" for a value that rounds to zero
    return text


def percent_label(fraction: float | None) -> str:
    """A fraction as a percentage with one decimal (``0.7941`` → ``79.4 %``); None → ``-``."""
    if fraction is None:
        return "-"
    return f"{number_label(100.0 * fraction, step=1.0)} %"


def time_label(t: float, span: float | None = None) -> str:
    """Epoch seconds ``t`` as a UTC date and time; shorter when the ``span`` shown is short."""
    try:
        d = datetime.fromtimestamp(float(t), UTC)
    except (TypeError, ValueError, OverflowError, OSError):
        return "-"
    if span is not None and span < 600:
        return d.strftime("%H:%M:%S")
    return d.strftime("%Y-%m-%d %H:%M")
