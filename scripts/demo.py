"""Deterministic generator of the bundled demo catalogue.

Draws small product-like pictures (one silhouette per leaf class, PIL.ImageDraw only) and
writes matching product titles, so that the pipeline can be tried end to end without
downloading a real catalogue.  Labels are 3-level class paths ``top<mid<leaf``.

Everything is driven by seeded ``numpy.random.Generator`` objects (one per item, one for the
row order), never by global random state, so two runs with the same arguments give
byte-identical ``data/catalogue.csv`` and ``images/*.jpg``.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

Point = tuple[float, float]
RGB = tuple[int, int, int]

CANVAS = 400  # side of the square drawing layer, in pixels (unit coordinates are scaled by it)
SUPERSAMPLE = 2  # the photo is composed at this multiple of its final size, then downsampled
IMAGE_SIZES: tuple[tuple[int, int], ...] = (
    (160, 160), (180, 180), (200, 200), (160, 200), (200, 160), (180, 200), (200, 180),
)
JPEG_QUALITY = 85
# Share of pictures that are close-ups of a part of the product, or show it small in the frame,
# and share of pastel (instead of white/grey) backdrops: these keep the demo from being trivial.
DETAIL_SHOT = 0.2
SMALL_SHOT = 0.15
PASTEL_BACKDROP = 0.25

# Colour names as they appear in titles -> the RGB drawn for them.
PALETTE: dict[str, RGB] = {
    "black": (32, 32, 34),
    "white": (246, 246, 244),
    "navy blue": (30, 42, 92),
    "blue": (42, 92, 190),
    "light blue": (140, 182, 224),
    "red": (196, 32, 42),
    "maroon": (112, 26, 42),
    "pink": (236, 150, 182),
    "purple": (112, 62, 142),
    "green": (42, 132, 72),
    "olive": (108, 114, 50),
    "teal": (30, 128, 130),
    "yellow": (236, 202, 44),
    "mustard": (204, 158, 40),
    "orange": (236, 122, 40),
    "grey": (130, 130, 134),
    "charcoal": (62, 64, 68),
    "beige": (222, 202, 166),
    "cream": (242, 232, 204),
    "khaki": (190, 174, 120),
    "tan": (192, 140, 88),
    "brown": (110, 70, 40),
    "silver": (192, 194, 200),
    "gold": (204, 166, 72),
}

PATTERN_WORDS = {"plain": "Solid", "stripes": "Striped", "dots": "Polka Dot", "checks": "Checked"}


# --------------------------------------------------------------------------- drawing helpers


def shade(rgb: RGB, f: float) -> RGB:
    """Darken (f < 1) a colour."""
    return tuple(int(round(v * f)) for v in rgb)  # type: ignore[return-value]


def tint(rgb: RGB, f: float) -> RGB:
    """Lighten a colour towards white by fraction f."""
    return tuple(int(round(v + (255 - v) * f)) for v in rgb)  # type: ignore[return-value]


def outline_of(rgb: RGB) -> RGB:
    """A visible outline colour for a fill colour (light fills get a grey edge)."""
    return shade(rgb, 0.62) if sum(rgb) > 160 else tint(rgb, 0.25)


def bezier(p0: Point, p1: Point, p2: Point, n: int = 12) -> list[Point]:
    """Points of a quadratic Bezier curve from p0 to p2 with control point p1."""
    out = []
    for i in range(n + 1):
        t = i / n
        a, b, c = (1 - t) ** 2, 2 * (1 - t) * t, t * t
        out.append((a * p0[0] + b * p1[0] + c * p2[0], a * p0[1] + b * p1[1] + c * p2[1]))
    return out


def mirror(pts: Sequence[Point], cx: float = 0.5) -> list[Point]:
    """Mirror points about the vertical line x = cx (reversed, to keep polygons ordered)."""
    return [(2 * cx - x, y) for x, y in reversed(pts)]


@dataclass
class Style:
    """Colours and surface pattern of one item."""

    colour_name: str
    base: RGB
    accent: RGB
    pattern: str = "plain"
    pattern_colour: RGB = (255, 255, 255)

    @property
    def dark(self) -> RGB:
        return shade(self.base, 0.7)

    @property
    def edge(self) -> RGB:
        return outline_of(self.base)


class Canvas:
    """A transparent square layer addressed in unit coordinates (0..1 on both axes)."""

    def __init__(self, size: int, style: Style, rng: np.random.Generator) -> None:
        self.size = size
        self.style = style
        self.img = Image.new("RGBA", (size, size), (0, 0, 0, 0))
        self.draw = ImageDraw.Draw(self.img)
        self.fabric = make_fabric(size, style, rng)

    def p(self, pts: Sequence[Point]) -> list[Point]:
        return [(x * self.size, y * self.size) for x, y in pts]

    def box(self, b: Sequence[float]) -> list[float]:
        x0, y0, x1, y1 = (v * self.size for v in b)
        return [min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)]

    def w(self, width: float) -> int:
        return max(1, int(round(width * self.size)))

    def poly(self, pts: Sequence[Point], fill: RGB | None, outline: RGB | None = None,
             width: float = 0.008) -> None:
        self.draw.polygon(self.p(pts), fill=fill, outline=outline,
                          width=self.w(width) if outline else 0)

    def ellipse(self, b: Sequence[float], fill: RGB | None, outline: RGB | None = None,
                width: float = 0.008) -> None:
        self.draw.ellipse(self.box(b), fill=fill, outline=outline,
                          width=self.w(width) if outline else 0)

    def rrect(self, b: Sequence[float], radius: float, fill: RGB | None,
              outline: RGB | None = None, width: float = 0.008) -> None:
        self.draw.rounded_rectangle(self.box(b), radius=radius * self.size, fill=fill,
                                    outline=outline, width=self.w(width) if outline else 0)

    def line(self, pts: Sequence[Point], fill: RGB, width: float = 0.008) -> None:
        self.draw.line(self.p(pts), fill=fill, width=self.w(width), joint="curve")

    def arc(self, b: Sequence[float], start: float, end: float, fill: RGB,
            width: float = 0.01) -> None:
        self.draw.arc(self.box(b), start, end, fill=fill, width=self.w(width))

    def dot(self, centre: Point, r: float, fill: RGB, outline: RGB | None = None) -> None:
        x, y = centre
        self.ellipse((x - r, y - r, x + r, y + r), fill, outline, 0.004)

    def _through_mask(self, paint: Callable[[ImageDraw.ImageDraw], None]) -> None:
        mask = Image.new("L", (self.size, self.size), 0)
        paint(ImageDraw.Draw(mask))
        self.img.paste(self.fabric, (0, 0), mask)

    def cloth_poly(self, pts: Sequence[Point], outline: bool = True) -> None:
        """Fill a polygon with the item's (possibly patterned) material."""
        xy = self.p(pts)
        self._through_mask(lambda d: d.polygon(xy, fill=255))
        if outline:
            self.poly(pts, None, self.style.edge)

    def cloth_ellipse(self, b: Sequence[float], outline: bool = True) -> None:
        xy = self.box(b)
        self._through_mask(lambda d: d.ellipse(xy, fill=255))
        if outline:
            self.ellipse(b, None, self.style.edge)

    def cloth_rrect(self, b: Sequence[float], radius: float, outline: bool = True) -> None:
        xy, r = self.box(b), radius * self.size
        self._through_mask(lambda d: d.rounded_rectangle(xy, radius=r, fill=255))
        if outline:
            self.rrect(b, radius, None, self.style.edge)


def make_fabric(size: int, style: Style, rng: np.random.Generator) -> Image.Image:
    """A full-size RGBA layer of the item's material: base colour plus optional pattern."""
    img = Image.new("RGBA", (size, size), style.base + (255,))
    d = ImageDraw.Draw(img)
    pc = style.pattern_colour
    spacing = rng.uniform(0.05, 0.1) * size
    if style.pattern == "stripes":
        width = int(spacing * rng.uniform(0.25, 0.5))
        vertical = rng.random() < 0.35
        k = 0.0
        while k < size:
            if vertical:
                d.rectangle([k, 0, k + width, size], fill=pc)
            else:
                d.rectangle([0, k, size, k + width], fill=pc)
            k += spacing
    elif style.pattern == "dots":
        r = spacing * rng.uniform(0.15, 0.28)
        for row, y in enumerate(np.arange(0, size + spacing, spacing)):
            off = spacing / 2 if row % 2 else 0.0
            for x in np.arange(off, size + spacing, spacing):
                d.ellipse([x - r, y - r, x + r, y + r], fill=pc)
    elif style.pattern == "checks":
        width = int(spacing * rng.uniform(0.15, 0.3))
        over = Image.new("RGBA", (size, size), (0, 0, 0, 0))
        od = ImageDraw.Draw(over)
        k = 0.0
        while k < size:
            od.rectangle([k, 0, k + width, size], fill=pc + (150,))
            od.rectangle([0, k, size, k + width], fill=pc + (150,))
            k += spacing
        img = Image.alpha_composite(img, over)
    return img


# --------------------------------------------------------------------------- one function per article
# Each function draws the product roughly inside the unit square and returns optional title
# words describing what it drew (e.g. "V-Neck"), so that title and picture agree.

def draw_tshirt(c: Canvas, rng: np.random.Generator) -> list[str]:
    cx, top = 0.5, 0.18
    bw = rng.uniform(0.21, 0.26)
    hem = rng.uniform(0.8, 0.88)
    nw = rng.uniform(0.065, 0.085)
    sl = rng.uniform(0.12, 0.17)
    body = [(cx - nw, top), (cx - bw + 0.02, top + 0.02), (cx - bw, top + 0.16), (cx - bw, hem),
            (cx + bw, hem), (cx + bw, top + 0.16), (cx + bw - 0.02, top + 0.02), (cx + nw, top)]
    neck_kind = _pick(rng, ("round", "round", "v", "polo"))
    vneck = neck_kind == "v"
    dip = 0.11 if vneck else 0.06
    neck = ([(cx + nw, top), (cx, top + dip), (cx - nw, top)] if vneck
            else bezier((cx + nw, top), (cx, top + 2 * dip), (cx - nw, top)))
    c.cloth_poly(body + neck[1:-1])
    c.poly([(cx - nw, top)] + neck[::-1][1:-1] + [(cx + nw, top)]
           + bezier((cx + nw, top), (cx, top - 0.03), (cx - nw, top))[1:], c.style.dark)
    c.line(neck, shade(c.style.base, 0.8), 0.014)
    for s in (-1, 1):
        sleeve = [(cx + s * (bw - 0.02), top + 0.02), (cx + s * (bw + sl), top + 0.12),
                  (cx + s * (bw + sl - 0.05), top + 0.22), (cx + s * (bw - 0.003), top + 0.17)]
        c.cloth_poly(sleeve)
    if neck_kind == "polo":  # knitted collar and a short two-button placket
        for s in (-1, 1):
            c.cloth_poly([(cx + s * (nw + 0.01), top - 0.015), (cx + s * 0.005, top + 0.06),
                          (cx + s * (nw + 0.03), top + 0.065)])
        c.rrect((cx - 0.018, top + 0.06, cx + 0.018, top + 0.17), 0.005, None, c.style.edge, 0.005)
        for y in (top + 0.09, top + 0.14):
            c.dot((cx, y), 0.008, tint(c.style.base, 0.5), c.style.edge)
        return ["Polo Collar"]
    return ["V-Neck" if vneck else "Round Neck"]


def draw_shirt(c: Canvas, rng: np.random.Generator) -> list[str]:
    cx, top = 0.5, 0.16
    bw = rng.uniform(0.2, 0.24)
    hem = rng.uniform(0.84, 0.9)
    nw = 0.06
    short = rng.random() < 0.4
    body = [(cx - nw, top), (cx - bw + 0.02, top + 0.02), (cx - bw, top + 0.16),
            (cx - bw, hem - 0.04)] + bezier((cx - bw, hem - 0.04), (cx, hem + 0.07),
                                              (cx + bw, hem - 0.04))[1:-1] + [
        (cx + bw, hem - 0.04), (cx + bw, top + 0.16), (cx + bw - 0.02, top + 0.02), (cx + nw, top)]
    c.cloth_poly(body)
    c.poly([(cx - nw, top), (cx + nw, top), (cx, top + 0.07)], c.style.dark)
    for s in (-1, 1):
        if short:
            sleeve = [(cx + s * (bw - 0.02), top + 0.02), (cx + s * (bw + 0.1), top + 0.2),
                      (cx + s * (bw + 0.04), top + 0.26), (cx + s * (bw - 0.003), top + 0.2)]
        else:
            sleeve = [(cx + s * (bw - 0.02), top + 0.02), (cx + s * (bw + 0.13), 0.72),
                      (cx + s * (bw + 0.05), 0.75), (cx + s * (bw - 0.003), top + 0.22)]
            cuff = [(cx + s * (bw + 0.122), 0.68), (cx + s * (bw + 0.13), 0.72),
                    (cx + s * (bw + 0.05), 0.75), (cx + s * (bw + 0.045), 0.71)]
        c.cloth_poly(sleeve)
        if not short:
            c.poly(cuff, None, c.style.edge, 0.006)
        collar = [(cx + s * (nw + 0.012), top - 0.02), (cx + s * 0.005, top + 0.075),
                  (cx + s * (nw + 0.035), top + 0.07)]
        c.cloth_poly(collar)
    c.line([(cx, top + 0.07), (cx, hem + 0.02)], c.style.edge, 0.006)
    btn = tint(c.style.base, 0.5) if sum(c.style.base) < 400 else shade(c.style.base, 0.75)
    for y in np.linspace(top + 0.11, hem - 0.04, 6):
        c.dot((cx + 0.012, float(y)), 0.009, btn, c.style.edge)
    if rng.random() < 0.6:
        c.rrect((cx - 0.17, top + 0.12, cx - 0.07, top + 0.23), 0.01, None, c.style.edge, 0.005)
    return ["Short Sleeves"] if short else []


def _trousers(c: Canvas, rng: np.random.Generator, leg_end: float, crotch: float,
              flare: float, turn_up: float = 0.0) -> None:
    """Front view of trousers; shorts are the same with short, flared legs."""
    cx, top = 0.5, 0.1
    ww = rng.uniform(0.18, 0.21)
    band = 0.06
    for s in (-1, 1):
        waist, hem_out = (cx + s * ww, top + band), (cx + s * (ww + flare), leg_end)
        hem_in = (cx + s * (0.02 + flare * 0.3), leg_end)
        c.cloth_poly([waist, hem_out, hem_in, (cx, crotch), (cx, top + band)])
        if turn_up:  # a folded cuff: a band across the bottom of the leg
            t = 1 - turn_up / (leg_end - top - band)
            u = 1 - turn_up / (leg_end - crotch)
            cuff_out = (waist[0] + t * (hem_out[0] - waist[0]), leg_end - turn_up)
            cuff_in = (cx + u * (hem_in[0] - cx), leg_end - turn_up)
            c.poly([cuff_out, hem_out, hem_in, cuff_in], shade(c.style.base, 0.88), c.style.edge)
    c.cloth_rrect((cx - ww, top, cx + ww, top + band), 0.006)
    stitch = tint(c.style.accent, 0.1)
    c.line(bezier((cx + 0.01, top + band), (cx + 0.06, crotch - 0.08), (cx + 0.005, crotch - 0.02)),
           stitch, 0.006)
    for s in (-1, 1):
        c.line(bezier((cx + s * (ww - 0.005), top + band + 0.06), (cx + s * (ww - 0.09), top + band + 0.05),
                      (cx + s * (ww - 0.11), top + band)), stitch, 0.006)
        for x in (cx + s * 0.05, cx + s * (ww - 0.03)):
            c.rrect((x - 0.008, top - 0.008, x + 0.008, top + band + 0.01), 0.004, c.style.dark)
    c.dot((cx, top + band / 2), 0.012, (200, 170, 90), (120, 100, 50))


def draw_jeans(c: Canvas, rng: np.random.Generator) -> list[str]:
    _trousers(c, rng, leg_end=rng.uniform(0.9, 0.96), crotch=0.4, flare=rng.uniform(-0.04, 0.02))
    return []


def draw_shorts(c: Canvas, rng: np.random.Generator) -> list[str]:
    turn_up = rng.random() < 0.5
    _trousers(c, rng, leg_end=rng.uniform(0.5, 0.58), crotch=0.36, flare=rng.uniform(0.03, 0.07),
              turn_up=0.035 if turn_up else 0.0)
    return ["Turn-Up"] if turn_up else []


def draw_sneaker(c: Canvas, rng: np.random.Generator) -> list[str]:
    """Side view, toe on the left: sole, upper, tongue, laces, side stripe, heel tab."""
    sole_c = PALETTE["white"] if rng.random() < 0.7 else PALETTE["black"]
    st = 0.6  # top of the sole
    h = rng.uniform(0.2, 0.26)  # height of the upper at the ankle
    instep = (0.3, st - 0.15)
    collar = (0.62, st - h - 0.02)
    c.poly([(0.5, collar[1] + 0.03), (0.56, collar[1] - 0.05), (0.64, collar[1] - 0.04),
            (0.64, collar[1] + 0.05)], shade(c.style.base, 0.85), c.style.edge, 0.005)  # tongue
    upper = (bezier((0.08, st), (0.08, st - 0.12), instep)
             + bezier(instep, (0.45, st - h + 0.02), collar)[1:]
             + bezier(collar, (0.76, st - h + 0.04), (0.9, st - h - 0.02))[1:]
             + [(0.93, st)])
    c.cloth_poly(upper)
    c.rrect((0.06, st - 0.01, 0.94, st + rng.uniform(0.08, 0.11)), 0.04, sole_c, outline_of(sole_c))
    c.poly(bezier((0.08, st), (0.08, st - 0.1), (0.24, st - 0.12)) + [(0.2, st)],
           tint(c.style.base, 0.25), c.style.edge, 0.005)  # toe cap
    lace = PALETTE["white"] if sum(c.style.base) < 500 else PALETTE["charcoal"]
    for i in range(5):
        t = (i + 0.5) / 5.5
        x = instep[0] + t * (collar[0] - instep[0])
        y = instep[1] + t * (collar[1] - instep[1]) - 0.06 * t * (1 - t)
        c.line([(x - 0.02, y + 0.015), (x + 0.03, y + 0.045)], lace, 0.012)
    c.line(bezier((0.3, st - 0.03), (0.6, st - 0.02), (0.82, st - h + 0.04)), c.style.accent, 0.03)
    c.poly([(0.85, st - h - 0.01), (0.9, st - h - 0.02), (0.93, st - 0.1), (0.9, st - 0.1)],
           c.style.accent)
    return []


def draw_boot(c: Canvas, rng: np.random.Generator) -> list[str]:
    shaft_top = rng.uniform(0.06, 0.2)
    sole_c = PALETTE["black"] if rng.random() < 0.6 else PALETTE["tan"]
    c.rrect((0.12, 0.79, 0.88, 0.87), 0.02, sole_c, outline_of(sole_c))
    c.poly([(0.66, 0.86), (0.88, 0.86), (0.87, 0.93), (0.68, 0.93)], sole_c, outline_of(sole_c))
    shaft = ([(0.5, shaft_top), (0.85, shaft_top), (0.88, 0.8), (0.14, 0.8)]
             + bezier((0.14, 0.8), (0.13, 0.6), (0.35, 0.57))[1:]
             + [(0.5, 0.5)])
    c.cloth_poly(shaft)
    c.line([(0.5, shaft_top + 0.02), (0.86, shaft_top + 0.02)], c.style.dark, 0.02)
    laced = rng.random() < 0.6
    if laced:
        for i in range(6):
            y = shaft_top + 0.07 + i * (0.5 - shaft_top) / 6
            c.dot((0.53 + i * 0.008, y), 0.01, PALETTE["gold"], (100, 80, 40))
            c.line([(0.51, y), (0.6, y + 0.03)], c.style.accent, 0.01)
    else:
        c.rrect((0.6, shaft_top + 0.06, 0.72, 0.55), 0.03, c.style.dark)
    c.rrect((0.82, shaft_top - 0.06, 0.86, shaft_top + 0.06), 0.01, c.style.dark)
    return ["Lace-Up"] if laced else ["Chelsea"]


def _footbed(cx: float, w: float, top: float, bottom: float) -> list[Point]:
    """Top view of a left/right sole: wide at the toes, narrow at the arch, round heel."""
    right = (bezier((cx, top), (cx + w * 1.1, top + 0.01), (cx + w * 0.85, top + 0.3))
             + bezier((cx + w * 0.85, top + 0.3), (cx + w * 0.6, top + 0.45),
                      (cx + w * 0.75, bottom - 0.08))[1:]
             + bezier((cx + w * 0.75, bottom - 0.08), (cx + w * 0.7, bottom), (cx, bottom))[1:])
    return right + mirror(right, cx)[1:]


def draw_flip_flops(c: Canvas, rng: np.random.Generator) -> list[str]:
    w = rng.uniform(0.15, 0.17)
    strap = c.style.accent
    for i, cx in enumerate((0.29, 0.71)):
        top = 0.1 + 0.04 * i
        sole = _footbed(cx, w, top, top + 0.8)
        c.cloth_poly(sole)
        post = (cx - 0.01 * (1 if i else -1), top + 0.14)
        for s in (-1, 1):
            c.line([post, (cx + s * w * 0.82, top + 0.36)], strap, 0.035)
        c.dot(post, 0.02, shade(strap, 0.8))
    return []


def draw_sandals(c: Canvas, rng: np.random.Generator) -> list[str]:
    w = rng.uniform(0.15, 0.17)
    strap = c.style.base
    bed = PALETTE["tan"] if c.style.colour_name != "tan" else PALETTE["brown"]
    for i, cx in enumerate((0.29, 0.71)):
        top = 0.1 + 0.04 * i
        c.poly(_footbed(cx, w, top, top + 0.8), bed, outline_of(bed))
        for y0, y1 in ((0.12, 0.22), (0.28, 0.36)):
            c.cloth_poly([(cx - w * 0.95, top + y0), (cx + w * 0.95, top + y0 - 0.03),
                          (cx + w * 0.9, top + y1 - 0.03), (cx - w * 0.9, top + y1)])
        c.cloth_poly([(cx - w * 0.85, top + 0.58), (cx + w * 0.85, top + 0.58),
                      (cx + w * 0.8, top + 0.64), (cx - w * 0.8, top + 0.64)])
        c.rrect((cx + w * 0.55, top + 0.57, cx + w * 0.85, top + 0.65), 0.005, None,
                PALETTE["gold"], 0.008)
    return []


def draw_handbag(c: Canvas, rng: np.random.Generator) -> list[str]:
    top = rng.uniform(0.38, 0.45)
    flare = rng.uniform(0.0, 0.06)
    c.arc((0.3, top - 0.28, 0.7, top + 0.2), 180, 360, shade(c.style.base, 0.8), 0.035)
    c.arc((0.3, top - 0.28, 0.7, top + 0.2), 180, 360, c.style.edge, 0.006)
    body = [(0.16 + flare, top), (0.84 - flare, top), (0.9, 0.86), (0.1, 0.86)]
    c.cloth_poly(body)
    if rng.random() < 0.5:  # flap with clasp
        c.cloth_poly([(0.16 + flare, top), (0.84 - flare, top), (0.8, top + 0.2), (0.5, top + 0.27),
                      (0.2, top + 0.2)])
        c.rrect((0.46, top + 0.22, 0.54, top + 0.29), 0.01, PALETTE["gold"], (120, 90, 40))
    else:
        c.line([(0.2 + flare, top + 0.05), (0.8 - flare, top + 0.05)], c.style.edge, 0.006)
        c.rrect((0.47, top + 0.02, 0.53, top + 0.1), 0.01, PALETTE["silver"], (90, 90, 90))
    for x in (0.3, 0.7):
        c.rrect((x - 0.025, top - 0.03, x + 0.025, top + 0.02), 0.008, PALETTE["gold"], (120, 90, 40))
    return []


def draw_backpack(c: Canvas, rng: np.random.Generator) -> list[str]:
    hw = rng.uniform(0.24, 0.28)
    c.arc((0.42, 0.06, 0.58, 0.2), 180, 360, c.style.dark, 0.025)
    for s in (-1, 1):
        c.rrect((0.5 + s * (hw + 0.045) - 0.03, 0.22, 0.5 + s * (hw + 0.045) + 0.03, 0.8), 0.02,
                c.style.dark)
    c.cloth_rrect((0.5 - hw, 0.12, 0.5 + hw, 0.9), 0.13)
    c.arc((0.5 - hw + 0.05, 0.16, 0.5 + hw - 0.05, 0.6), 200, 340, c.style.edge, 0.008)
    pocket = (0.5 - hw + 0.06, 0.56, 0.5 + hw - 0.06, 0.86)
    c.rrect(pocket, 0.06, shade(c.style.base, 0.85), c.style.edge)
    c.line([(pocket[0] + 0.03, 0.6), (pocket[2] - 0.03, 0.6)], c.style.accent, 0.012)
    c.rrect((0.5 - 0.015, 0.6, 0.5 + 0.015, 0.67), 0.006, PALETTE["silver"])
    if rng.random() < 0.5:
        c.rrect((0.5 - hw + 0.04, 0.72, 0.5 + hw - 0.04, 0.75), 0.01, c.style.accent)
        return ["with Reflective Strip"]
    return []


def draw_watch(c: Canvas, rng: np.random.Generator) -> list[str]:
    case = PALETTE["gold"] if rng.random() < 0.35 else PALETTE["silver"]
    sw = rng.uniform(0.085, 0.11)
    c.cloth_rrect((0.5 - sw, 0.0, 0.5 + sw, 1.0), 0.03)
    for y in (0.8, 0.86, 0.92):
        c.dot((0.5, y), 0.01, c.style.dark)
    r = rng.uniform(0.19, 0.24)
    c.rrect((0.5 + r - 0.01, 0.47, 0.5 + r + 0.04, 0.53), 0.01, case, shade(case, 0.6))
    c.ellipse((0.5 - r, 0.5 - r, 0.5 + r, 0.5 + r), case, shade(case, 0.6), 0.01)
    dial = PALETTE["white"] if rng.random() < 0.5 else PALETTE["black"]
    ink = PALETTE["black"] if dial == PALETTE["white"] else PALETTE["white"]
    ri = r * 0.84
    c.ellipse((0.5 - ri, 0.5 - ri, 0.5 + ri, 0.5 + ri), dial)
    for k in range(12):
        a = k * np.pi / 6
        r0 = ri * (0.75 if k % 3 == 0 else 0.86)
        c.line([(0.5 + r0 * np.sin(a), 0.5 - r0 * np.cos(a)),
                (0.5 + ri * 0.95 * np.sin(a), 0.5 - ri * 0.95 * np.cos(a))], ink, 0.008)
    ha, ma = rng.uniform(0, 2 * np.pi), rng.uniform(0, 2 * np.pi)
    c.line([(0.5, 0.5), (0.5 + ri * 0.5 * np.sin(ha), 0.5 - ri * 0.5 * np.cos(ha))], ink, 0.014)
    c.line([(0.5, 0.5), (0.5 + ri * 0.8 * np.sin(ma), 0.5 - ri * 0.8 * np.cos(ma))], ink, 0.009)
    c.dot((0.5, 0.5), 0.012, c.style.accent)
    return ["Analogue"]


def draw_sunglasses(c: Canvas, rng: np.random.Generator) -> list[str]:
    lens = (rng.uniform(20, 60),) * 2 + (rng.uniform(20, 70),)
    lens_c = tuple(int(v) for v in lens)
    frame = c.style.base
    aviator = rng.random() < 0.5
    for s in (-1, 1):
        x_in, x_out = 0.5 + s * 0.05, 0.5 + s * 0.4
        x0, x1 = min(x_in, x_out), max(x_in, x_out)
        if aviator:
            pts = (bezier((x_in, 0.4), ((x_in + x_out) / 2, 0.36), (x_out, 0.4))
                   + bezier((x_out, 0.4), (x_out, 0.7), ((x_in + x_out) / 2, 0.68))[1:]
                   + bezier(((x_in + x_out) / 2, 0.68), (x_in, 0.66), (x_in, 0.4))[1:])
            c.poly(pts, lens_c, frame, 0.014)
        else:
            c.rrect((x0, 0.38, x1, 0.64), 0.07, lens_c, frame, 0.03)
        c.line([(x_out, 0.41), (0.5 + s * 0.48, 0.36)], frame, 0.025)
        c.line([(x0 + 0.05, 0.44), (x0 + 0.1, 0.42)], (200, 200, 210), 0.012)  # glint
    c.arc((0.44, 0.37, 0.56, 0.47), 200, 340, frame, 0.02)
    return ["Aviator"] if aviator else ["Wayfarer"]


def draw_mug(c: Canvas, rng: np.random.Generator) -> list[str]:
    x0, x1 = 0.2, rng.uniform(0.64, 0.7)
    top, bottom = rng.uniform(0.18, 0.3), 0.86
    c.arc((x1 - 0.1, top + 0.1, x1 + 0.2, bottom - 0.14), 270, 450, c.style.edge, 0.055)
    c.arc((x1 - 0.1, top + 0.1, x1 + 0.2, bottom - 0.14), 270, 450, shade(c.style.base, 0.9), 0.038)
    eh = 0.05
    c.cloth_poly([(x0, top + eh / 2)] + bezier((x0, bottom - eh / 2), ((x0 + x1) / 2, bottom + eh),
                                                  (x1, bottom - eh / 2)) + [(x1, top + eh / 2)])
    c.ellipse((x0, top, x1, top + eh), shade(c.style.base, 0.6), c.style.edge, 0.008)
    c.ellipse((x0 + 0.015, top + 0.006, x1 - 0.015, top + eh - 0.004), shade(c.style.base, 0.45))
    return ["Ceramic"] if rng.random() < 0.7 else ["Stoneware"]


def draw_plate(c: Canvas, rng: np.random.Generator) -> list[str]:
    squash = rng.uniform(0.45, 1.0)
    h = 0.45 * squash
    outer = (0.05, 0.5 - h, 0.95, 0.5 + h)
    c.ellipse((0.06, 0.5 - h + 0.03, 0.96, 0.5 + h + 0.03), shade(c.style.base, 0.75))
    c.cloth_ellipse(outer)
    k = rng.uniform(0.62, 0.72)
    inner = (0.5 - 0.45 * k, 0.5 - h * k, 0.5 + 0.45 * k, 0.5 + h * k)
    c.ellipse(inner, shade(c.style.base, 0.93), c.style.edge, 0.005)
    if rng.random() < 0.6:
        m = (1 + k) / 2
        c.ellipse((0.5 - 0.45 * m, 0.5 - h * m, 0.5 + 0.45 * m, 0.5 + h * m), None,
                  c.style.accent, 0.012)
        return ["Rimmed"]
    return []


def draw_lamp(c: Canvas, rng: np.random.Generator) -> list[str]:
    shade_bottom = rng.uniform(0.38, 0.46)
    tw, bw = rng.uniform(0.14, 0.22), rng.uniform(0.3, 0.36)
    stem = PALETTE["gold"] if rng.random() < 0.4 else PALETTE["black"]
    c.rrect((0.49, shade_bottom - 0.05, 0.51, 0.86), 0.005, stem)
    c.ellipse((0.33, 0.83, 0.67, 0.92), stem, outline_of(stem))
    c.cloth_poly([(0.5 - tw, 0.1), (0.5 + tw, 0.1), (0.5 + bw, shade_bottom), (0.5 - bw, shade_bottom)])
    c.line([(0.5 - bw + 0.01, shade_bottom - 0.015), (0.5 + bw - 0.01, shade_bottom - 0.015)],
           c.style.dark, 0.012)
    c.poly([(0.5 - bw + 0.08, shade_bottom), (0.5 + bw - 0.08, shade_bottom),
            (0.5 + bw - 0.12, shade_bottom + 0.02), (0.5 - bw + 0.12, shade_bottom + 0.02)],
           (255, 236, 170))
    return ["with Fabric Shade"] if rng.random() < 0.5 else []


def draw_vase(c: Canvas, rng: np.random.Generator) -> list[str]:
    neck = rng.uniform(0.06, 0.1)
    belly = rng.uniform(0.2, 0.3)
    belly_y = rng.uniform(0.45, 0.65)
    foot = rng.uniform(0.1, 0.16)
    right = (bezier((0.5 + neck * 1.4, 0.1), (0.5 + neck * 0.7, 0.2), (0.5 + neck, 0.25))
             + bezier((0.5 + neck, 0.25), (0.5 + belly * 1.2, belly_y - 0.15), (0.5 + belly, belly_y))[1:]
             + bezier((0.5 + belly, belly_y), (0.5 + belly * 0.9, 0.85), (0.5 + foot, 0.9))[1:])
    c.cloth_poly(right + mirror(right))
    c.ellipse((0.5 - neck * 1.4, 0.085, 0.5 + neck * 1.4, 0.115), shade(c.style.base, 0.5),
              c.style.edge, 0.006)
    c.line(bezier((0.5 + belly * 0.55, belly_y - 0.12), (0.5 + belly * 0.8, belly_y),
                  (0.5 + belly * 0.55, belly_y + 0.14)), tint(c.style.base, 0.45), 0.02)
    return []


# --------------------------------------------------------------------------- class table

DrawFn = Callable[[Canvas, np.random.Generator], list[str]]


@dataclass(frozen=True)
class LeafClass:
    """One leaf class: how to draw it and how to name it."""

    label: str
    draw: DrawFn
    weight: int  # number of items in the default 300-item catalogue
    nouns: tuple[str, ...]
    colours: tuple[str, ...]
    brands: tuple[str, ...]
    genders: tuple[str, ...] = ("",)
    adjectives: tuple[str, ...] = ()
    patterns: tuple[str, ...] = ("plain",)
    hints: tuple[str, ...] = ()  # phrases used instead of the noun in a few titles
    plural: tuple[str, ...] = ()  # nouns for "Set of N" titles (home classes only)
    mirror: bool = True  # may be flipped left-right
    max_rotation: float = 8.0


APPAREL_COLOURS = ("black", "white", "navy blue", "blue", "red", "maroon", "green", "olive",
                   "yellow", "mustard", "grey", "charcoal", "pink", "teal", "beige", "purple")
DENIM_COLOURS = ("blue", "navy blue", "light blue", "black", "grey", "charcoal")
SHOE_COLOURS = ("white", "black", "grey", "navy blue", "red", "blue", "olive", "beige")
LEATHER_COLOURS = ("brown", "tan", "black", "maroon", "olive", "beige")
CERAMIC_COLOURS = ("white", "cream", "black", "blue", "teal", "mustard", "grey", "pink",
                   "green", "red", "beige")

CLASSES: tuple[LeafClass, ...] = (
    LeafClass("apparel<topwear<tshirts", draw_tshirt, 26,
              ("T-shirt", "T-shirt", "Tshirt", "Tee", "T-Shirt"), APPAREL_COLOURS,
              ("Roadster", "HRX by Hrithik Roshan", "Puma", "Nike", "U.S. Polo Assn.", "WROGN",
               "H&M", "Levis", "Highlander"),
              ("Men", "Women", "Men", "Boys", "Unisex"),
              ("Slim Fit", "Regular Fit", "Oversized", "Pure Cotton", "Organic Cotton"),
              ("plain", "plain", "stripes", "dots"), ("Cotton Top", "Casual Top")),
    LeafClass("apparel<topwear<shirts", draw_shirt, 20,
              ("Shirt", "Casual Shirt", "Formal Shirt", "Shirt"), APPAREL_COLOURS,
              ("Roadster", "Louis Philippe", "Peter England", "Van Heusen", "U.S. Polo Assn.",
               "HIGHLANDER", "H&M", "Levis"),
              ("Men", "Men", "Women", "Boys"),
              ("Slim Fit", "Regular Fit", "Pure Cotton", "Linen", "Button-Down", "Opaque"),
              ("plain", "stripes", "checks", "checks"), ("Button-Down Top", "Collared Top")),
    LeafClass("apparel<bottomwear<jeans", draw_jeans, 22,
              ("Jeans", "Denim Jeans", "Skinny Fit Jeans", "Straight Fit Jeans"), DENIM_COLOURS,
              ("Roadster", "Levis", "Wrangler", "Pepe Jeans", "Lee", "Mast & Harbour", "H&M"),
              ("Men", "Women", "Men", "Boys"),
              ("Mid-Rise", "High-Rise", "Stretchable", "Clean Look", "Slim Fit"),
              ("plain",), ("Denim Trousers", "Five-Pocket Denims")),
    LeafClass("apparel<bottomwear<shorts", draw_shorts, 16,
              ("Shorts", "Denim Shorts", "Chino Shorts", "Bermuda Shorts"),
              DENIM_COLOURS + ("beige", "khaki", "olive", "navy blue"),
              ("Roadster", "Puma", "Levis", "U.S. Polo Assn.", "H&M", "Mast & Harbour"),
              ("Men", "Women", "Men", "Boys", "Girls"),
              ("Mid-Rise", "Regular Fit", "Slim Fit", "Pure Cotton"),
              ("plain", "plain", "checks"), ("Knee-Length Bottoms",)),
    LeafClass("footwear<shoes<sneakers", draw_sneaker, 24,
              ("Sneakers", "Sneakers", "Trainers", "Running Shoes", "Casual Shoes", "Sports Shoes"),
              SHOE_COLOURS,
              ("Nike", "Puma", "Adidas", "Skechers", "Red Tape", "ASICS", "Campus", "HRX by Hrithik Roshan"),
              ("Men", "Women", "Unisex"),
              ("Lace-Up", "Mesh", "Colourblocked", "Lightweight", "Textured"),
              ("plain",), ("Low-Top Lace-Ups",)),
    LeafClass("footwear<shoes<boots", draw_boot, 18,
              ("Boots", "Ankle Boots", "Mid-Top Boots", "Boots"), LEATHER_COLOURS,
              ("Woodland", "Red Chief", "Timberland", "Roadster", "Dr. Martens", "Red Tape"),
              ("Men", "Women", "Men"),
              ("Leather", "Suede", "Genuine Leather", "Textured"),
              ("plain",), ("High-Top Leather Footwear",)),
    LeafClass("footwear<sandal<flip flops", draw_flip_flops, 14,
              ("Flip Flops", "Flip-Flops", "Thong Flip-Flops", "Flip Flops"),
              ("black", "navy blue", "blue", "red", "grey", "yellow", "teal", "pink", "white"),
              ("Havaianas", "Puma", "Adidas", "Flite", "Bata", "Crocs", "Roadster"),
              ("Men", "Women", "Unisex", "Kids"),
              ("Rubber", "Lightweight", "Printed", "Soft"), ("plain", "plain", "stripes", "dots"),
              ("Thong Slippers",), mirror=False),
    LeafClass("footwear<sandal<sandals", draw_sandals, 12,
              ("Sandals", "Strappy Sandals", "Comfort Sandals", "Sandals"),
              ("black", "brown", "tan", "olive", "navy blue", "maroon", "beige"),
              ("Bata", "Mochi", "Catwalk", "Woodland", "Metro", "Red Chief"),
              ("Men", "Women", "Women", "Unisex"),
              ("Leather", "Buckled", "Open Toe", "Synthetic"), ("plain",),
              ("Open Toe Strappy Footwear",), mirror=False),
    LeafClass("accessories<bags<handbags", draw_handbag, 20,
              ("Handbag", "Handheld Bag", "Tote Bag", "Shoulder Bag", "Satchel"),
              LEATHER_COLOURS + ("red", "pink", "black", "navy blue", "white", "mustard"),
              ("Lavie", "Caprese", "Baggit", "Hidesign", "Accessorize", "DressBerry"),
              ("Women",), ("PU", "Leather", "Structured", "Textured", "Quilted"),
              ("plain", "plain", "plain", "checks"), ("Structured Carryall",)),
    LeafClass("accessories<bags<backpacks", draw_backpack, 22,
              ("Backpack", "Laptop Backpack", "Rucksack", "Backpack"),
              ("black", "navy blue", "grey", "blue", "red", "olive", "maroon", "teal", "charcoal"),
              ("Wildcraft", "American Tourister", "Skybags", "F Gear", "Puma", "Nike", "Adidas"),
              ("Unisex", "Men", "Women", "Kids"),
              ("25 L", "Water Resistant", "Padded", "Colourblocked", "Graphic"),
              ("plain", "plain", "checks", "dots"), ("Laptop Bag with Straps",)),
    LeafClass("accessories<watches<watches", draw_watch, 16,
              ("Watch", "Analogue Watch", "Wrist Watch", "Watch"),
              ("black", "brown", "tan", "silver", "gold", "navy blue", "maroon", "grey"),
              ("Titan", "Fastrack", "Fossil", "Timex", "Casio", "Sonata", "Daniel Wellington"),
              ("Men", "Women", "Unisex"),
              ("Leather Strap", "Stainless Steel", "Water Resistant", "Slim"),
              ("plain",), ("Timepiece",), mirror=False, max_rotation=20.0),
    LeafClass("accessories<eyewear<sunglasses", draw_sunglasses, 12,
              ("Sunglasses", "Sunglasses", "Shades", "Sunglasses"),
              ("black", "gold", "silver", "brown", "maroon", "navy blue", "tan"),
              ("Ray-Ban", "Fastrack", "IDEE", "Carrera", "Polaroid", "Opium"),
              ("Men", "Women", "Unisex"),
              ("UV Protected", "Polarised", "Full Rim", "Tinted"),
              ("plain",), ("UV Protected Eyewear",), mirror=False, max_rotation=12.0),
    LeafClass("home<kitchen<mugs", draw_mug, 24,
              ("Coffee Mug", "Mug", "Coffee Mug", "Tea Mug"), CERAMIC_COLOURS,
              ("Borosil", "Home Centre", "Chumbak", "Nestasia", "Clay Craft", "Ellementry"),
              ("",), ("Matte", "Glossy", "Handcrafted", "Microwave Safe", "350 ml"),
              ("plain", "plain", "stripes", "dots"), ("Handled Drinkware",),
              ("Coffee Mugs", "Mugs", "Tea Mugs")),
    LeafClass("home<kitchen<plates", draw_plate, 18,
              ("Plate", "Dinner Plate", "Quarter Plate", "Serving Plate"), CERAMIC_COLOURS,
              ("Clay Craft", "Corelle", "Cello", "Borosil", "Home Centre", "Ellementry"),
              ("",), ("Melamine", "Ceramic", "Bone China", "Stoneware", "Glossy", "Round"),
              ("plain", "plain", "dots"), ("Round Dinnerware",),
              ("Dinner Plates", "Quarter Plates", "Plates"), mirror=False, max_rotation=15.0),
    LeafClass("home<decor<lamps", draw_lamp, 18,
              ("Table Lamp", "Lamp", "Bedside Lamp", "Study Lamp"),
              ("white", "cream", "beige", "mustard", "teal", "grey", "navy blue", "pink", "green"),
              ("Philips", "Home Centre", "Pure Home + Living", "Fabindia", "Homesake"),
              ("",), ("Contemporary", "Minimalist", "Metal Base", "Textured"),
              ("plain", "plain", "stripes"), ("Bedside Light",)),
    LeafClass("home<decor<vases", draw_vase, 18,
              ("Vase", "Flower Vase", "Decorative Vase", "Bud Vase"), CERAMIC_COLOURS,
              ("Home Centre", "Fabindia", "Nestasia", "Pure Home + Living", "TAYHAA", "Ellementry"),
              ("",), ("Ceramic", "Glass", "Terracotta", "Textured", "Handcrafted", "Glossy"),
              ("plain", "plain", "stripes", "dots"), ("Table Decor Showpiece",)),
)


# --------------------------------------------------------------------------- titles


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def make_title(cls: LeafClass, style: Style, traits: list[str], rng: np.random.Generator) -> str:
    """Product title in the usual catalogue style: brand, gender, colour, adjectives, noun."""
    colour = style.colour_name.title()
    brand = _pick(rng, cls.brands)
    gender = _pick(rng, cls.genders)
    pattern = PATTERN_WORDS[style.pattern] if style.pattern != "plain" or rng.random() < 0.3 else ""
    adjective = _pick(rng, cls.adjectives) if cls.adjectives and rng.random() < 0.6 else ""
    trait = traits[0] if traits and rng.random() < 0.6 else ""
    noun = _pick(rng, cls.hints) if cls.hints and rng.random() < 0.08 else _pick(rng, cls.nouns)
    trailing = ""
    if trait.startswith("with "):  # "... Backpack with Reflective Strip"
        trait, trailing = "", trait
    if cls.plural and rng.random() < 0.3:
        n = int(rng.integers(2, 7))
        parts = [brand, f"Set of {n}", colour, pattern, adjective, trait, _pick(rng, cls.plural)]
    elif rng.random() < 0.75:
        parts = [brand, gender, colour, pattern, adjective, trait, noun]
    else:
        parts = [brand, gender, adjective, colour, pattern, trait, noun]
    parts.append(trailing)
    # at most 12 words: drop optional parts, least important first
    for optional in (pattern, trailing, adjective, trait, gender):
        if sum(len(p.split()) for p in parts) <= 12:
            break
        if optional:
            parts.remove(optional)
    words: list[str] = []
    for word in " ".join(p for p in parts if p).split():
        if word.lower() not in (w.lower() for w in words):  # no "Leather Leather Strap"
            words.append(word)
    return " ".join(words)


# --------------------------------------------------------------------------- pictures


def _background(size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    """A light studio backdrop (white, grey, off-white or pastel), maybe with a soft gradient."""
    if rng.random() < PASTEL_BACKDROP:
        base = np.array(tint(PALETTE[_pick(rng, tuple(PALETTE))], rng.uniform(0.6, 0.8)), dtype=np.float64)
    else:
        base = np.array([(255, 255, 255), (242, 242, 242), (250, 246, 238), (240, 244, 250)][
            int(rng.integers(4))], dtype=np.float64) - rng.uniform(0, 6)
    w, h = size
    fall = rng.uniform(0, 18) if rng.random() < 0.6 else 0.0
    ramp = np.linspace(0.0, 1.0, h)[:, None, None] * fall
    arr = np.clip(base[None, None, :] - ramp, 0, 255).astype(np.uint8)
    return Image.fromarray(np.repeat(arr, w, axis=1), "RGB")


def _choose_style(cls: LeafClass, rng: np.random.Generator) -> Style:
    name = _pick(rng, cls.colours)
    base = tuple(int(np.clip(v + rng.integers(-10, 11), 0, 255)) for v in PALETTE[name])
    others = [n for n in PALETTE if n != name]
    accent = PALETTE[_pick(rng, others)]
    pattern = _pick(rng, cls.patterns)
    light = sum(base) > 450
    pattern_colour = PALETTE[_pick(rng, ("navy blue", "black", "red", "maroon", "teal") if light
                                   else ("white", "cream", "yellow", "light blue", "pink"))]
    return Style(name, base, accent, pattern, pattern_colour)  # type: ignore[arg-type]


def _detail_crop(product: Image.Image, rng: np.random.Generator, tries: int = 20) -> Image.Image:
    """A window of 35-60% of the product's size that is mostly product, not background."""
    alpha = np.asarray(product.getchannel("A")) > 128
    crop = product
    for _ in range(tries):
        f = rng.uniform(0.35, 0.6)
        cw, ch = max(1, int(product.width * f)), max(1, int(product.height * f))
        x0 = int(rng.integers(0, product.width - cw + 1))
        y0 = int(rng.integers(0, product.height - ch + 1))
        crop = product.crop((x0, y0, x0 + cw, y0 + ch))
        if alpha[y0:y0 + ch, x0:x0 + cw].mean() >= 0.55:
            return crop
    return crop


def render_item(cls: LeafClass, rng: np.random.Generator) -> tuple[Image.Image, str]:
    """Draw one product photo and write its title."""
    style = _choose_style(cls, rng)
    canvas = Canvas(CANVAS, style, rng)
    traits = cls.draw(canvas, rng)
    title = make_title(cls, style, traits, rng)

    product = canvas.img
    if cls.mirror and rng.random() < 0.5:
        product = product.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    angle = float(rng.uniform(-cls.max_rotation, cls.max_rotation))
    product = product.rotate(angle, resample=Image.Resampling.BICUBIC, expand=True)
    product = product.crop(product.getbbox())

    w, h = IMAGE_SIZES[int(rng.integers(len(IMAGE_SIZES)))]
    W, H = w * SUPERSAMPLE, h * SUPERSAMPLE
    view = rng.random()
    if view < DETAIL_SHOT:  # close-up of a part of the product, filling the frame
        product = _detail_crop(product, rng)
        scale = max(W / product.width, H / product.height)
    elif view < DETAIL_SHOT + SMALL_SHOT:  # product small in the frame
        scale = rng.uniform(0.4, 0.55) * min(W / product.width, H / product.height)
    else:
        scale = rng.uniform(0.65, 0.92) * min(W / product.width, H / product.height)
    pw, ph = max(1, round(product.width * scale)), max(1, round(product.height * scale))
    product = product.resize((pw, ph), Image.Resampling.LANCZOS)
    x = int(round((W - pw) / 2 + rng.uniform(-0.4, 0.4) * abs(W - pw)))
    y = int(round((H - ph) / 2 + rng.uniform(-0.4, 0.4) * abs(H - ph)))

    photo = _background((W, H), rng)
    shadow = Image.new("L", (W, H), 0)
    shadow.paste(product.getchannel("A"), (x + 4 * SUPERSAMPLE, y + 5 * SUPERSAMPLE))
    shadow = shadow.filter(ImageFilter.GaussianBlur(5 * SUPERSAMPLE)).point(lambda v: v * 30 // 100)
    photo.paste((90, 90, 90), (0, 0), shadow)
    photo.paste(product, (x, y), product)
    return photo.resize((w, h), Image.Resampling.LANCZOS), title


# --------------------------------------------------------------------------- catalogue


def class_counts(n_items: int) -> list[int]:
    """Items per class: proportional to the class weights, at least 1 each.

    With the default ``n_items`` (the sum of the weights, 300) this is exactly the weights.
    """
    if n_items < len(CLASSES):
        raise ValueError(f"n_items must be at least {len(CLASSES)} (one per class)")
    weights = np.array([c.weight for c in CLASSES], dtype=np.float64)
    raw = weights / weights.sum() * n_items
    counts = np.maximum(np.floor(raw).astype(int), 1)
    while counts.sum() < n_items:  # largest remainder first
        counts[int(np.argmax(raw - counts))] += 1
    while counts.sum() > n_items:  # only possible after the "at least 1" bump
        counts[int(np.argmax(np.where(counts > 1, counts - raw, -np.inf)))] -= 1
    return [int(v) for v in counts]


def make_demo_catalogue(out_dir: Path, seed: int = 0, n_items: int = 300) -> Path:
    """Write ``out_dir/data/catalogue.csv`` and ``out_dir/images/*.jpg``; return the CSV path.

    The CSV has columns ``image,text,label``; ``image`` is relative to the CSV's folder
    (``../images/<id>.jpg``).  Same arguments -> byte-identical files.
    """
    out_dir = Path(out_dir)
    data_dir, image_dir = out_dir / "data", out_dir / "images"
    data_dir.mkdir(parents=True, exist_ok=True)
    image_dir.mkdir(parents=True, exist_ok=True)

    order_rng = np.random.default_rng([seed, 1_000_003])
    ids = order_rng.choice(np.arange(10_000, 100_000), size=n_items, replace=False)
    rows = []
    k = 0
    for ci, (cls, count) in enumerate(zip(CLASSES, class_counts(n_items))):
        for j in range(count):
            rng = np.random.default_rng([seed, ci, j])
            photo, title = render_item(cls, rng)
            name = f"{int(ids[k])}.jpg"
            photo.save(image_dir / name, format="JPEG", quality=JPEG_QUALITY)
            rows.append((f"../images/{name}", title, cls.label))
            k += 1
    rows = [rows[i] for i in order_rng.permutation(len(rows))]

    csv_path = data_dir / "catalogue.csv"
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["image", "text", "label"])
        writer.writerows(rows)
    return csv_path
