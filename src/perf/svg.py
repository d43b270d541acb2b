"""A small horizontal (stacked) bar chart written as SVG: benchmark plots without a plotting library."""
from __future__ import annotations

import math
from dataclasses import dataclass
from html import escape

ROW_H, LABEL_W, PANEL_W, GAP, TOP = 26, 130, 330, 40, 56
COLOURS = ("#4878a8", "#e0a040", "#b05050", "#6a9f58", "#8c6bb1")


@dataclass
class Panel:
    title: str
    segments: list[tuple[str, list[float]]]  # (legend name, one value per label); stacked left to right


def _fmt(x: float) -> str:
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def _ticks(top: float) -> list[float]:
    """About five round gridline values from 0 to ``top``."""
    raw = top / 5
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    return [i * step for i in range(int(top / step) + 1)]


def bar_chart(title: str, labels: list[str], panels: list[Panel]) -> str:
    """SVG text: one row per label, one column (its own scale) per panel, the total written at each bar."""
    height = TOP + ROW_H * len(labels) + 44 + 16 * max((len(p.segments) for p in panels), default=1)
    width = LABEL_W + len(panels) * (PANEL_W + GAP)
    svg = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
           f'font-size="12">')
    out = [svg, f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="10" y="20" font-size="15" font-weight="bold">{escape(title)}</text>']
    for i, label in enumerate(labels):
        out.append(f'<text x="{LABEL_W - 8}" y="{TOP + i * ROW_H + 17}" text-anchor="end">{escape(label)}</text>')
    for k, panel in enumerate(panels):
        x0 = LABEL_W + k * (PANEL_W + GAP)
        totals = [sum(seg[1][i] for seg in panel.segments) for i in range(len(labels))]
        top = max(totals, default=0) * 1.15 or 1.0
        scale = (PANEL_W - 10) / top
        out.append(f'<text x="{x0}" y="{TOP - 14}" font-weight="bold">{escape(panel.title)}</text>')
        for t in _ticks(top):
            x = x0 + t * scale
            out.append(f'<line x1="{x:.1f}" y1="{TOP - 4}" x2="{x:.1f}" y2="{TOP + ROW_H * len(labels)}" '
                       f'stroke="#ddd"/>')
            out.append(f'<text x="{x:.1f}" y="{TOP + ROW_H * len(labels) + 14}" text-anchor="middle" '
                       f'fill="#555" font-size="10">{t:g}</text>')
        for i in range(len(labels)):
            x, y = x0, TOP + i * ROW_H + 4
            for s, (name, values) in enumerate(panel.segments):
                w = max(values[i], 0) * scale
                out.append(f'<rect x="{x:.1f}" y="{y}" width="{w:.1f}" height="{ROW_H - 8}" '
                           f'fill="{COLOURS[s % len(COLOURS)]}"><title>{escape(name)}: {values[i]:.4g}</title></rect>')
                x += w
            out.append(f'<text x="{x + 4:.1f}" y="{y + 13}" font-size="11">'
                       f'{escape(_fmt(totals[i]))}</text>')
        if len(panel.segments) > 1:  # the legend, one entry per line under the panel
            for s, (name, _) in enumerate(panel.segments):
                ly = TOP + ROW_H * len(labels) + 36 + 16 * s
                out.append(f'<rect x="{x0}" y="{ly - 10}" width="10" height="10" fill="{COLOURS[s % len(COLOURS)]}"/>')
                out.append(f'<text x="{x0 + 14}" y="{ly}">{escape(name)}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


__all__ = ["Panel", "bar_chart"]
