"""Small line charts drawn on the server as inline SVG: no JavaScript, no image files."""

from django.utils.html import escape, format_html
from django.utils.safestring import mark_safe

COLOURS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea"]


def line_chart(series, *, width=640, height=240, x_label="", y_label="", title=""):
    """An SVG of one or more lines. ``series``: {name: [(x, y), ...]}; empty ones are skipped."""
    series = {name: points for name, points in series.items() if points}
    if not series:
        return format_html('<p class="chart-empty">{}</p>', "no data yet")
    xs = [x for points in series.values() for x, _ in points]
    ys = [y for points in series.values() for _, y in points]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    if x1 == x0:
        x1 = x0 + 1
    if y1 == y0:
        y0, y1 = y0 - 0.5, y1 + 0.5
    pad = (y1 - y0) * 0.05
    y0, y1 = y0 - pad, y1 + pad
    left, right, top, bottom = 56, 12, 24 if title else 12, 36

    def sx(x):
        return left + (x - x0) / (x1 - x0) * (width - left - right)

    def sy(y):
        return top + (y1 - y) / (y1 - y0) * (height - top - bottom)

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" '
        f'width="100%" role="img" aria-label="{escape(title or y_label)}" class="chart">'
    ]
    if title:
        parts.append(f'<text x="{left}" y="16" font-size="13">{escape(title)}</text>')
    for i in range(5):
        value = y0 + (y1 - y0) * i / 4
        y = sy(value)
        parts.append(
            f'<line x1="{left}" x2="{width - right}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e5e7eb"/>'
            f'<text x="{left - 6}" y="{y + 4:.1f}" font-size="11" text-anchor="end">'
            f"{_tick(value)}</text>"
        )
    whole_xs = all(float(x).is_integer() for x in xs)  # steps, positions: no 15.8 on the axis
    ticks = [x0 + (x1 - x0) * i / 4 for i in range(5)]
    if whole_xs:  # rounding a short range repeats ticks (1, 2, 2, 2, 3): draw each once
        ticks = list(dict.fromkeys(round(value) for value in ticks))
    for value in ticks:
        parts.append(
            f'<text x="{sx(value):.1f}" y="{height - bottom + 16}" font-size="11" '
            f'text-anchor="middle">{_tick(value)}</text>'
        )
    parts.append(
        f'<text x="{(left + width - right) / 2}" y="{height - 4}" font-size="11" '
        f'text-anchor="middle">{escape(x_label)}</text>'
        f'<text x="12" y="{(top + height - bottom) / 2}" font-size="11" text-anchor="middle" '
        f'transform="rotate(-90 12 {(top + height - bottom) / 2})">{escape(y_label)}</text>'
    )
    for index, (name, points) in enumerate(series.items()):
        colour = COLOURS[index % len(COLOURS)]
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in points)
        parts.append(
            f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{path}">'
            f"<title>{escape(name)}</title></polyline>"
            f'<text x="{width - right - 4}" y="{top + 14 + 14 * index}" font-size="11" '
            f'text-anchor="end" fill="{colour}">{escape(name)}</text>'
        )
    parts.append("</svg>")
    return mark_safe("".join(parts))  # every text in it went through escape()


def _tick(value):
    if abs(value) >= 100 or float(value).is_integer():
        return f"{value:.0f}"
    return f"{value:.2f}" if abs(value) < 10 else f"{value:.1f}"
