"""Line charts drawn with Pillow alone (no plotting library): the `make bench` scaling figure.

A figure is a row of panels; each panel has its own axes (x on a log₂ scale for
batch sizes, y linear from 0), tick labels, a title, and the series shared by
every panel are named once in a legend along the top.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from PIL import Image, ImageDraw, ImageFont

Point = Tuple[float, float]
Colour = Tuple[int, int, int]

PALETTE: Dict[str, Colour] = {"fp32": (31, 119, 180), "bf16": (230, 120, 20), "fp16": (44, 160, 44)}
GREY, LIGHT, BLACK = (110, 110, 110), (228, 228, 228), (30, 30, 30)
PANEL_W, PANEL_H, LEGEND_H = 420, 340, 56
MARGIN_L, MARGIN_R, MARGIN_T, MARGIN_B = 64, 18, 34, 48


@dataclass
class Series:
    label: str
    colour: Colour
    points: List[Point]
    dashed: bool = False
    marker: str = "circle"  # or "square", "triangle"


@dataclass
class Panel:
    title: str
    x_label: str
    y_label: str
    series: List[Series]
    x_ticks: Sequence[float]
    reference_y: Optional[float] = None  # a dashed guide line, e.g. the ideal 2× speed-up
    log_x: bool = True


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)  # Pillow ≥ 10.1: a scalable font
    except TypeError:
        return ImageFont.load_default()


def nice_ticks(top: float, count: int = 5) -> List[float]:
    """0, step, 2·step, ... up to at least `top`, with step 1, 2 or 5 × 10^k."""
    if top <= 0:
        return [0.0, 1.0]
    raw = top / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    return [i * step for i in range(int(math.ceil(top / step - 1e-9)) + 1)]


def _label(value: float) -> str:
    return f"{value:g}" if abs(value) < 1e4 else f"{value:.0e}"


def _line(draw: ImageDraw.ImageDraw, a: Point, b: Point, colour: Colour, width: int, dashed: bool) -> None:
    if not dashed:
        draw.line([a, b], fill=colour, width=width)
        return
    length = math.dist(a, b)
    dash, gap = 9.0, 6.0
    t = 0.0
    while t < length:
        end = min(t + dash, length)
        draw.line([(a[0] + (b[0] - a[0]) * t / length, a[1] + (b[1] - a[1]) * t / length),
                   (a[0] + (b[0] - a[0]) * end / length, a[1] + (b[1] - a[1]) * end / length)],
                  fill=colour, width=width)
        t = end + gap


def _marker(draw: ImageDraw.ImageDraw, at: Point, colour: Colour, shape: str, r: float = 4.5) -> None:
    box = [at[0] - r, at[1] - r, at[0] + r, at[1] + r]
    if shape == "square":
        draw.rectangle(box, fill=colour)
    elif shape == "triangle":
        draw.polygon([(at[0], at[1] - r - 1), (at[0] + r + 1, at[1] + r), (at[0] - r - 1, at[1] + r)], fill=colour)
    else:
        draw.ellipse(box, fill=colour)


def _draw_panel(image: Image.Image, origin: Point, panel: Panel) -> None:
    draw = ImageDraw.Draw(image)
    font, small = _font(15), _font(13)
    left, top = origin[0] + MARGIN_L, origin[1] + MARGIN_T
    right, bottom = origin[0] + PANEL_W - MARGIN_R, origin[1] + PANEL_H - MARGIN_B
    xs = [x for s in panel.series for x, _ in s.points] + list(panel.x_ticks)
    ys = [y for s in panel.series for _, y in s.points] + ([panel.reference_y] if panel.reference_y else [])
    fx = (lambda x: math.log2(x)) if panel.log_x else (lambda x: x)
    x_lo, x_hi = fx(min(xs)), fx(max(xs))
    pad = 0.08 * ((x_hi - x_lo) or 1.0)
    x_lo, x_hi = x_lo - pad, x_hi + pad
    y_ticks = nice_ticks(max(ys) * 1.05 if ys else 1.0)
    y_hi = y_ticks[-1]

    def to_px(p: Point) -> Point:
        return (left + (fx(p[0]) - x_lo) / (x_hi - x_lo) * (right - left), bottom - p[1] / y_hi * (bottom - top))

    for y in y_ticks:  # grid and y tick labels
        _, py = to_px((min(xs), y))
        draw.line([(left, py), (right, py)], fill=LIGHT, width=1)
        text = _label(y)
        w = draw.textlength(text, font=small)
        draw.text((left - 6 - w, py - 7), text, fill=GREY, font=small)
    for x in panel.x_ticks:
        px, _ = to_px((x, 0))
        draw.line([(px, bottom), (px, bottom + 4)], fill=GREY, width=1)
        text = _label(x)
        draw.text((px - draw.textlength(text, font=small) / 2, bottom + 6), text, fill=GREY, font=small)
    draw.line([(left, top), (left, bottom), (right, bottom)], fill=BLACK, width=1)
    if panel.reference_y:
        _line(draw, (left, to_px((min(xs), panel.reference_y))[1]), (right, to_px((min(xs), panel.reference_y))[1]),
              GREY, 1, dashed=True)
    for s in panel.series:
        pts = [to_px(p) for p in sorted(s.points)]
        for a, b in zip(pts, pts[1:]):
            _line(draw, a, b, s.colour, 2, s.dashed)
        for p in pts:
            _marker(draw, p, s.colour, s.marker)
    title_w = draw.textlength(panel.title, font=font)
    draw.text(((left + right) / 2 - title_w / 2, origin[1] + 8), panel.title, fill=BLACK, font=font)
    x_w = draw.textlength(panel.x_label, font=small)
    draw.text(((left + right) / 2 - x_w / 2, bottom + 24), panel.x_label, fill=BLACK, font=small)
    label = Image.new("RGBA", (int(draw.textlength(panel.y_label, font=small)) + 4, 18), (255, 255, 255, 0))
    ImageDraw.Draw(label).text((2, 0), panel.y_label, fill=BLACK, font=small)
    rotated = label.rotate(90, expand=True)
    image.paste(rotated, (int(origin[0] + 4), int((top + bottom) / 2 - rotated.height / 2)), rotated)


def _draw_legend(draw: ImageDraw.ImageDraw, width: int, entries: List[Series], title: str) -> None:
    font = _font(14)
    draw.text((14, 8), title, fill=BLACK, font=_font(16))
    x, y = 14.0, 32.0
    for s in entries:
        _line(draw, (x, y + 8), (x + 34, y + 8), s.colour, 2, s.dashed)
        _marker(draw, (x + 17, y + 8), s.colour, s.marker)
        draw.text((x + 42, y), s.label, fill=BLACK, font=font)
        x += 42 + draw.textlength(s.label, font=font) + 26
        if x > width - 160:
            x, y = 14.0, y + 20


def draw_figure(panels: List[Panel], path: Path, title: str) -> Path:
    """Panels side by side under a legend of the first panel's series; written as PNG."""
    width = PANEL_W * len(panels)
    image = Image.new("RGB", (width, LEGEND_H + PANEL_H), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    seen, entries = set(), []
    for panel in panels:
        for s in panel.series:
            if s.label not in seen:
                seen.add(s.label)
                entries.append(s)
    _draw_legend(draw, width, entries, title)
    for i, panel in enumerate(panels):
        _draw_panel(image, (i * PANEL_W, LEGEND_H), panel)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path
