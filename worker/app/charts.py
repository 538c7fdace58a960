"""Inline SVG charts for the dashboard, each with labelled axes, tick values and every point's value
on hover: a line chart (training curves, accuracy per version) and horizontal bars (per-class
accuracy, pending images). Values from outside are drawn only when finite; labels are escaped."""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeGuard

from shared.redact import printable

PALETTE = ("#1a9c4b", "#3469b3", "#b3474a", "#8a5cb8", "#c27c0e", "#2a8c8c")
MARKED_POINTS = 80  # more points than this: the line alone (hover values would bloat the page)


def e(value: Any) -> str:
    """Text from anywhere, safe in HTML text and attribute values, and shown as it is: control and
    bidi characters (ESC, U+202E) become visible escapes (shared.redact.printable) before HTML escaping."""
    return html.escape(printable("" if value is None else value), quote=True)


def finite(value: Any) -> TypeGuard[float]:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def nice_ticks(lo: float, hi: float, most: int = 6) -> list[float]:
    """Round tick values covering [lo, hi]: steps of 1, 2 or 5 times a power of ten."""
    if not (finite(lo) and finite(hi)) or hi <= lo:
        return [lo] if finite(lo) else []
    raw = (hi - lo) / max(1, most - 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    count = math.floor((hi - first) / step + 1e-9) + 1
    return [round(first + i * step, 12) for i in range(count)]


def label(value: float) -> str:
    """A tick or point value, short: integers as integers, otherwise up to 3 significant decimals."""
    if float(value).is_integer() and abs(value) < 1e6:
        return str(int(value))
    return f"{value:.3g}" if abs(value) < 1e-2 or abs(value) >= 1e4 else f"{value:.3f}".rstrip("0").rstrip(".")


@dataclass
class Series:
    name: str
    points: list[tuple[float, float]]
    dashed: bool = False
    color: str = ""
    point_labels: list[str] = field(default_factory=list)  # hover text per point (default: "name x: y")


@dataclass
class Frame:
    """The plotting area inside the axes and the mapping from data to pixels."""

    width: int
    height: int
    left: int = 52
    right: int = 14
    top: int = 28
    bottom: int = 40
    x_lo: float = 0.0
    x_hi: float = 1.0
    y_lo: float = 0.0
    y_hi: float = 1.0

    def x(self, value: float) -> float:
        return self.left + (value - self.x_lo) / ((self.x_hi - self.x_lo) or 1.0) * (self.width - self.left - self.right)

    def y(self, value: float) -> float:
        return self.height - self.bottom - (value - self.y_lo) / ((self.y_hi - self.y_lo) or 1.0) * (self.height - self.top - self.bottom)


def _axes(frame: Frame, x_label: str, y_label: str, x_ticks: Sequence[float], x_names: Mapping[float, str] | None = None) -> str:
    """Both axes with their ticks, gridlines and titles."""
    parts = []
    bottom, left = frame.height - frame.bottom, frame.left
    for t in nice_ticks(frame.y_lo, frame.y_hi, 5):
        y = frame.y(t)
        parts.append(f'<line x1="{left}" y1="{y:.1f}" x2="{frame.width - frame.right}" y2="{y:.1f}" stroke="#eef1f5"/>'
                     f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end" data-tick="y">{label(t)}</text>')  # fmt: skip
    for t in x_ticks:
        x = frame.x(t)
        name = (x_names or {}).get(t, label(t))
        parts.append(f'<line x1="{x:.1f}" y1="{bottom}" x2="{x:.1f}" y2="{bottom + 4}" stroke="#8896a6"/>'
                     f'<text x="{x:.1f}" y="{bottom + 16}" text-anchor="middle" data-tick="x">{e(name)}</text>')  # fmt: skip
    parts.append(f'<line x1="{left}" y1="{frame.top}" x2="{left}" y2="{bottom}" stroke="#8896a6"/>'
                 f'<line x1="{left}" y1="{bottom}" x2="{frame.width - frame.right}" y2="{bottom}" stroke="#8896a6"/>'
                 f'<text x="{(left + frame.width - frame.right) / 2:.1f}" y="{frame.height - 4}" text-anchor="middle" data-axis="x">{e(x_label)}</text>'
                 f'<text x="12" y="{(frame.top + bottom) / 2:.1f}" text-anchor="middle" transform="rotate(-90 12 {(frame.top + bottom) / 2:.1f})" '
                 f'data-axis="y">{e(y_label)}</text>')  # fmt: skip
    return "".join(parts)


def line_chart(
    series: Sequence[Series],
    *,
    plot: str,
    title: str,
    x_label: str,
    y_label: str,
    y_range: tuple[float, float] | None = None,
    x_names: Mapping[float, str] | None = None,
    width: int = 440,
    height: int = 240,
) -> str:
    """Lines over a shared x axis; each point's value on hover, the last value of each line written out."""
    drawn = [Series(s.name, [(x, y) for x, y in s.points if finite(x) and finite(y)], s.dashed, s.color or PALETTE[i % len(PALETTE)],
                    s.point_labels) for i, s in enumerate(series)]  # fmt: skip
    xs = [x for s in drawn for x, _ in s.points]
    ys = [y for s in drawn for _, y in s.points]
    if not xs:
        return f'<p class="muted" data-plot="{e(plot)}">{e(title)}: nothing to draw yet</p>'
    x_lo, x_hi = min(xs), max(xs)
    if x_hi == x_lo:
        x_lo, x_hi = x_lo - 1, x_hi + 1
    if y_range is not None:
        y_lo, y_hi = min(y_range[0], min(ys)), max(y_range[1], max(ys))
    else:
        y_lo, y_hi = min(0.0, min(ys)), max(ys) * 1.1 if max(ys) > 0 else 1.0
    frame = Frame(width, height, right=44, x_lo=x_lo, x_hi=x_hi, y_lo=y_lo, y_hi=y_hi)  # the right margin holds the last values
    x_ticks = sorted(x_names) if x_names else [t for t in nice_ticks(x_lo, x_hi, 6) if x_lo <= t <= x_hi]
    if all(float(x).is_integer() for x in xs):  # epochs, versions: no tick between two whole numbers
        x_ticks = [t for t in x_ticks if float(t).is_integer()] or x_ticks
    if x_names and len(x_ticks) > 12:  # many named points (versions): every n-th name
        x_ticks = x_ticks[:: math.ceil(len(x_ticks) / 12)]
    body, legend, ends = [], [], []
    for i, s in enumerate(drawn):
        if not s.points:
            continue
        coords = " ".join(f"{frame.x(x):.1f},{frame.y(y):.1f}" for x, y in s.points)
        dash = ' stroke-dasharray="5 3"' if s.dashed else ""
        body.append(f'<polyline points="{coords}" fill="none" stroke="{s.color}" stroke-width="1.8"{dash} data-series="{e(s.name)}"/>')
        if len(s.points) <= MARKED_POINTS:
            for j, (x, y) in enumerate(s.points):
                text = s.point_labels[j] if j < len(s.point_labels) else f"{s.name} at {label(x)}: {label(y)}"
                body.append(f'<circle cx="{frame.x(x):.1f}" cy="{frame.y(y):.1f}" r="3" fill="{s.color}"><title>{e(text)}</title></circle>')
        ends.append((frame.y(s.points[-1][1]) - 5, frame.x(s.points[-1][0]), s))
        swatch_x = frame.left + 130 * i
        legend.append(f'<line x1="{swatch_x}" y1="12" x2="{swatch_x + 18}" y2="12" stroke="{s.color}" stroke-width="2"{dash}/>'
                      f'<text x="{swatch_x + 22}" y="16">{e(s.name)}</text>')  # fmt: skip
    placed = -1e9
    for y, x, s in sorted(ends, key=lambda end: end[0]):  # each line's last value, written out without overlapping another
        placed = max(y, placed + 12)
        body.append(f'<text x="{x + 6:.1f}" y="{placed + 9:.1f}" fill="{s.color}" data-value="{e(s.name)}">{label(s.points[-1][1])}</text>')
    return (
        f'<svg data-plot="{e(plot)}" role="img" aria-label="{e(title)}" viewBox="0 0 {width} {height}" width="{width}" height="{height}">'
        f"<title>{e(title)}</title>{_axes(frame, x_label, y_label, x_ticks, x_names)}{''.join(body)}{''.join(legend)}</svg>"
    )


def bar_chart(values: Mapping[str, float | None], *, plot: str, title: str, x_label: str, x_max: float | None = None,
              marker: tuple[float, str] | None = None, width: int = 440, most: int = 50) -> str:  # fmt: skip
    """Horizontal bars, one per label, each with its value written beside it; `marker` draws a
    dashed line at a value (a threshold). At most `most` bars (the rest are counted)."""
    items = list(values.items())[:most]
    if not items:
        return f'<p class="muted" data-plot="{e(plot)}">{e(title)}: nothing to draw yet</p>'
    numbers = [v for _, v in items if finite(v)]
    top: float = x_max if x_max is not None else max([*numbers, marker[0] if marker else 0.0, 1e-9])
    row, left, right = 22, 130, 56
    height = row * len(items) + 44
    frame = Frame(width, height, left=left, right=right, top=6, bottom=38, x_lo=0.0, x_hi=top)
    parts = []
    for i, (name, value) in enumerate(items):
        y = frame.top + i * row
        shown, w = "n/a", 0.0
        if finite(value):
            shown, w = label(value), max(0.0, frame.x(min(float(value), top)) - left)
        parts.append(f'<text x="{left - 6}" y="{y + 15}" text-anchor="end">{e(printable(name, limit=22))}</text>'
                     f'<rect x="{left}" y="{y + 4}" width="{w:.1f}" height="14" fill="#3469b3"><title>{e(name)}: {shown}</title></rect>'
                     f'<text x="{left + w + 4:.1f}" y="{y + 15}" data-value="{e(name)}">{shown}</text>')  # fmt: skip
    bottom = height - frame.bottom
    for t in nice_ticks(0.0, top, 5):
        x = frame.x(t)
        parts.append(f'<line x1="{x:.1f}" y1="{bottom}" x2="{x:.1f}" y2="{bottom + 4}" stroke="#8896a6"/>'
                     f'<text x="{x:.1f}" y="{bottom + 16}" text-anchor="middle" data-tick="x">{label(t)}</text>')  # fmt: skip
    parts.append(f'<line x1="{left}" y1="{frame.top}" x2="{left}" y2="{bottom}" stroke="#8896a6"/>'
                 f'<line x1="{left}" y1="{bottom}" x2="{width - right}" y2="{bottom}" stroke="#8896a6"/>'
                 f'<text x="{(left + width - right) / 2:.1f}" y="{height - 4}" text-anchor="middle" data-axis="x">{e(x_label)}</text>')  # fmt: skip
    if marker is not None and finite(marker[0]):
        x = frame.x(min(marker[0], top))
        parts.append(f'<line x1="{x:.1f}" y1="{frame.top}" x2="{x:.1f}" y2="{bottom}" stroke="#b3474a" stroke-dasharray="3 3">'
                     f"<title>{e(marker[1])}</title></line>")  # fmt: skip
    more = len(values) - len(items)
    note = f'<p class="muted">and {more} more</p>' if more > 0 else ""
    return (
        f'<svg data-plot="{e(plot)}" role="img" aria-label="{e(title)}" viewBox="0 0 {width} {height}" width="{width}" height="{height}">'
        f"<title>{e(title)}</title>{''.join(parts)}</svg>{note}"
    )
