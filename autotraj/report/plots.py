"""Inline SVG charts for the HTML report, drawn by hand, and the escaping every report part uses.

- `esc(text)`: text made safe for HTML (and inline SVG) content and attribute values; lone
  surrogates and control characters (which model output can hold) become U+FFFD.
- `line_chart`, `bar_chart`, `histogram`: one `<svg>` element each, sized by its viewBox so it
  scales with the page; every point and bar carries a `<title>` tooltip with its value.

Pure functions of numbers and labels. Not here: reading runs or deciding what to plot (report/page.py).
"""

from __future__ import annotations

import html
import math
import re
from collections.abc import Mapping, Sequence

PALETTE = ("#4c78a8", "#f58518", "#54a24b", "#e45756", "#72b7b2", "#b279a2", "#9d755d")
HEIGHT = 270
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_BOTTOM = 52, 14, 42
LEGEND_Y, LEGEND_ROW = 34, 16  # baseline of the first legend row (under the title), row height
_INVALID = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ud800-\udfff]")


def clean(text: str) -> str:
    """`text` with the characters an HTML page cannot hold replaced by U+FFFD.

    >>> clean("a\\x00b\\ud800")
    'a\\ufffdb\\ufffd'
    """
    return _INVALID.sub("\ufffd", text)


def esc(text: object) -> str:
    """HTML-escaped, cleaned `str(text)` (quotes too: safe inside attribute values).

    >>> esc("</script><b>")
    '&lt;/script&gt;&lt;b&gt;'
    """
    return html.escape(clean(str(text)), quote=True)


def fmt(value: float) -> str:
    """A short label for an axis tick or a tooltip.

    >>> [fmt(v) for v in (0.25, 3.0, 1234.5, 1e-05)]
    ['0.25', '3', '1234', '1e-5']
    """
    if value == 0 or 0.01 <= abs(value) < 1e6:
        return f"{value:.4g}" if abs(value) < 1000 else f"{value:.0f}"
    return f"{value:.0e}".replace("e-0", "e-").replace("e+0", "e+")


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """About `count` round tick values covering [lo, hi] (steps of 1, 2 or 5 times 10^k).

    >>> nice_ticks(0, 1)
    [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    >>> nice_ticks(3, 3)
    [2.0, 2.5, 3.0, 3.5, 4.0]
    >>> nice_ticks(2, 24, 6)  # floats for whole-number ranges too (training steps)
    [0.0, 5.0, 10.0, 15.0, 20.0, 25.0]
    """
    if hi <= lo:
        lo, hi = lo - 1, hi + 1
    raw = (hi - lo) / count
    magnitude = 10.0 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    first = math.floor(lo / step + 1e-9)
    last = math.ceil(hi / step - 1e-9)
    return [round(i * step, 12) for i in range(first, last + 1)]


class _Axes:
    """Maps data coordinates to the pixels of the plotting area of a `width` x HEIGHT chart
    whose area starts at `top` (under the title and the legend)."""

    def __init__(self, width: int, top: float, x_range: tuple[float, float], y_ticks: list[float]):
        self.width, self.top = width, top
        self.x0, self.x1 = x_range
        self.y0, self.y1 = y_ticks[0], y_ticks[-1]
        self.y_ticks = y_ticks

    def x(self, value: float) -> float:
        span = (self.x1 - self.x0) or 1.0
        inner = self.width - MARGIN_LEFT - MARGIN_RIGHT
        return MARGIN_LEFT + (value - self.x0) / span * inner

    def y(self, value: float) -> float:
        inner = HEIGHT - self.top - MARGIN_BOTTOM
        return HEIGHT - MARGIN_BOTTOM - (value - self.y0) / (self.y1 - self.y0) * inner

    def grid(self, y_label: str) -> str:
        right = self.width - MARGIN_RIGHT
        parts = []
        for tick in self.y_ticks:
            y = self.y(tick)
            parts.append(
                f'<line class="grid" x1="{MARGIN_LEFT}" x2="{right}" y1="{y:.1f}" y2="{y:.1f}"/>'
                f'<text class="tick" x="{MARGIN_LEFT - 5}" y="{y + 3.5:.1f}" '
                f'text-anchor="end">{esc(fmt(tick))}</text>'
            )
        middle = (self.top + HEIGHT - MARGIN_BOTTOM) / 2
        parts.append(
            f'<text class="axis-label" transform="translate(12 {middle:.0f}) rotate(-90)" '
            f'text-anchor="middle">{esc(y_label)}</text>'
        )
        return "".join(parts)


def _legend(width: int, entries: Sequence[tuple[str, str]]) -> tuple[str, float]:
    """The legend of (color, label) entries in rows under the title, and where the plot starts."""
    parts, x, y = [], float(MARGIN_LEFT), LEGEND_Y
    for color, label in entries:
        item = 6.4 * len(label) + 26  # an 11px label is about 6.4px a character
        if x + item > width - MARGIN_RIGHT and x > MARGIN_LEFT:
            x, y = float(MARGIN_LEFT), y + LEGEND_ROW
        parts.append(
            f'<rect x="{x:.0f}" y="{y - 9}" width="10" height="10" fill="{color}"/>'
            f'<text class="legend" x="{x + 14:.0f}" y="{y}">{esc(label)}</text>'
        )
        x += item
    return "".join(parts), y + 14


def _svg(width: int, title: str, legend: str, body: str) -> str:
    return (
        f'<svg class="chart" viewBox="0 0 {width} {HEIGHT}" style="max-width:{width * 1.4:.0f}px" '
        f'role="img" '
        f'xmlns="http://www.w3.org/2000/svg"><title>{esc(title)}</title>'
        f'<text class="chart-title" x="{MARGIN_LEFT}" y="16">{esc(title)}</text>'
        f"{legend}{body}</svg>"
    )


def _x_axis(axes: _Axes, ticks: Sequence[tuple[float, str]], x_label: str) -> str:
    base = HEIGHT - MARGIN_BOTTOM
    parts = [
        f'<line class="axis" x1="{MARGIN_LEFT}" x2="{axes.width - MARGIN_RIGHT}" '
        f'y1="{base}" y2="{base}"/>'
    ]
    for value, label in ticks:
        parts.append(
            f'<text class="tick" x="{axes.x(value):.1f}" y="{base + 14}" '
            f'text-anchor="middle">{esc(label)}</text>'
        )
    parts.append(
        f'<text class="axis-label" x="{(MARGIN_LEFT + axes.width - MARGIN_RIGHT) / 2:.0f}" '
        f'y="{HEIGHT - 6}" text-anchor="middle">{esc(x_label)}</text>'
    )
    return "".join(parts)


def _color(i: int) -> str:
    return PALETTE[i % len(PALETTE)]


def line_chart(
    title: str,
    series: Mapping[str, Sequence[tuple[float, float]]],
    *,
    x_label: str,
    y_label: str,
    y_range: tuple[float, float] | None = None,
    references: Mapping[str, float] | None = None,
    width: int = 480,
) -> str:
    """Lines of (x, y) points per series; `references` are labelled dashed horizontal lines."""
    references = references or {}
    xs = [x for points in series.values() for x, _ in points]
    ys = [y for points in series.values() for _, y in points] + list(references.values())
    entries = [(_color(i), name) for i, name in enumerate(series)]
    entries += [
        (_color(len(series) + j), f"{name} {fmt(value)}")
        for j, (name, value) in enumerate(references.items())
    ]
    legend, top = _legend(width, entries)
    lo, hi = y_range or (min(ys), max(ys))
    axes = _Axes(width, top, (min(xs), max(xs)), nice_ticks(lo, hi))
    whole = all(float(x).is_integer() for x in xs)  # steps: no tick between two steps
    x_ticks = [
        t
        for t in nice_ticks(min(xs), max(xs), 6)
        if min(xs) <= t <= max(xs) and (t.is_integer() or not whole)
    ]
    body = [axes.grid(y_label), _x_axis(axes, [(t, fmt(t)) for t in x_ticks], x_label)]
    for i, (name, points) in enumerate(series.items()):
        path = " ".join(f"{axes.x(x):.1f},{axes.y(y):.1f}" for x, y in points)
        body.append(
            f'<polyline fill="none" stroke="{_color(i)}" stroke-width="2" points="{path}"/>'
        )
        if len(points) <= 60:
            body += [
                f'<circle cx="{axes.x(x):.1f}" cy="{axes.y(y):.1f}" r="2.6" fill="{_color(i)}">'
                f"<title>{esc(name)}: step {esc(fmt(x))}: {esc(fmt(y))}</title></circle>"
                for x, y in points
            ]
    for j, (name, value) in enumerate(references.items()):
        y = axes.y(value)
        body.append(
            f'<line x1="{MARGIN_LEFT}" x2="{width - MARGIN_RIGHT}" y1="{y:.1f}" y2="{y:.1f}" '
            f'stroke="{_color(len(series) + j)}" stroke-width="1.5" stroke-dasharray="6 4">'
            f"<title>{esc(name)}: {esc(fmt(value))}</title></line>"
        )
    return _svg(width, title, legend, "".join(body))


def bar_chart(
    title: str,
    groups: Sequence[str],
    series: Mapping[str, Sequence[float | None]],
    *,
    y_label: str,
    y_range: tuple[float, float] | None = None,
    width: int = 480,
) -> str:
    """Grouped bars: one group per label in `groups`, one bar per series (None: no bar)."""
    values = [v for vs in series.values() for v in vs if v is not None]
    legend, top = _legend(width, [(_color(i), name) for i, name in enumerate(series)])
    lo, hi = y_range or (min(0.0, *values), max(values, default=1.0))
    axes = _Axes(width, top, (0.0, float(len(groups))), nice_ticks(lo, hi))
    body = [axes.grid(y_label), _x_axis(axes, [(i + 0.5, g) for i, g in enumerate(groups)], "")]
    group_width = axes.x(1) - axes.x(0)
    slot = group_width * 0.8 / max(1, len(series))
    for i, (name, bars) in enumerate(series.items()):
        for g, value in enumerate(bars):
            if value is None:
                continue
            left = axes.x(g) + group_width * 0.1 + i * slot
            high, low = axes.y(max(value, 0.0)), axes.y(min(value, 0.0))
            body.append(
                f'<rect x="{left:.1f}" y="{high:.1f}" width="{slot * 0.92:.1f}" '
                f'height="{low - high:.1f}" fill="{_color(i)}">'
                f"<title>{esc(name)} on {esc(groups[g])}: {esc(fmt(value))}</title></rect>"
            )
    return _svg(width, title, legend, "".join(body))


def histogram(
    title: str,
    series: Mapping[str, Sequence[float]],
    *,
    x_label: str,
    bins: int = 20,
    width: int = 480,
) -> str:
    """Side-by-side histograms on shared bins; bar heights are the share of each series (series
    of different sizes compare), the legend gives each series' size and mean. NaN and infinite
    values are left out."""
    series = {name: [v for v in vs if math.isfinite(v)] for name, vs in series.items()}
    values = [v for vs in series.values() for v in vs]
    lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
    if hi == lo:
        lo, hi = lo - 0.5, hi + 0.5
    step = (hi - lo) / bins
    shares = {}
    for name, vs in series.items():
        counts = [0] * bins
        for v in vs:
            counts[min(bins - 1, int((v - lo) / step))] += 1
        shares[name] = [c / max(1, len(vs)) for c in counts]
    entries = [
        (_color(i), f"{name} (n={len(vs)}, mean {fmt(sum(vs) / max(1, len(vs)))})")
        for i, (name, vs) in enumerate(series.items())
    ]
    legend, top = _legend(width, entries)
    top_share = max(s for ss in shares.values() for s in ss)
    axes = _Axes(width, top, (lo, hi), nice_ticks(0.0, top_share))
    x_ticks = [t for t in nice_ticks(lo, hi, 6) if lo <= t <= hi]
    body = [axes.grid("share of trajectories")]
    body.append(_x_axis(axes, [(t, fmt(t)) for t in x_ticks], x_label))
    slot = (axes.x(lo + step) - axes.x(lo)) / max(1, len(series))
    for i, (name, ss) in enumerate(shares.items()):
        for b, share in enumerate(ss):
            if share == 0:
                continue
            left = axes.x(lo + b * step) + i * slot
            body.append(
                f'<rect x="{left:.1f}" y="{axes.y(share):.1f}" width="{max(slot - 0.6, 0.8):.1f}" '
                f'height="{axes.y(0) - axes.y(share):.1f}" fill="{_color(i)}" fill-opacity="0.85">'
                f"<title>{esc(name)}: {esc(fmt(lo + b * step))}-{esc(fmt(lo + (b + 1) * step))}:"
                f" {share:.1%}</title></rect>"
            )
    return _svg(width, title, legend, "".join(body))
