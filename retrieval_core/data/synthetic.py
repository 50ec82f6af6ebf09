"""Deterministic procedural garment catalog: the embedded default dataset.

Every product is a seeded random draw (category, colour, pattern, sleeves and shape
details such as neckline, hem, logo or pocket) rendered as filled polygons. Each product
gets one clean "shop" view and a few hard "consumer" views (rotation, perspective, crop,
clutter, occlusion, lighting, blur/noise, low JPEG quality), so a model trained on it
has a real street-to-shop retrieval problem without any download.

Only Pillow, numpy and the standard library are used, and no transcendental numpy ufunc
runs on arrays, so the same config yields byte-identical files on every run.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import pathlib
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter

GENERATOR_VERSION = "1"

CATEGORIES: tuple[str, ...] = ("tshirt", "longsleeve", "dress", "jacket")
CATEGORIES += ("trousers", "shorts", "skirt", "hat")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (200, 30, 40),
    "blue": (35, 75, 195),
    "green": (35, 145, 60),
    "yellow": (240, 205, 40),
    "orange": (245, 125, 25),
    "pink": (240, 135, 185),
    "purple": (120, 50, 160),
    "black": (28, 28, 32),
    "white": (242, 242, 238),
    "grey": (128, 128, 132),
}
PATTERNS: tuple[str, ...] = ("solid", "stripes", "dots", "checks", "zigzag")
SLEEVE_LENGTHS: tuple[str, ...] = ("none", "short", "long")
ATTRIBUTE_COLUMNS: tuple[str, ...] = ("colour", "pattern", "sleeve_length")
_ID_COLUMNS = ("item_id", "product_id", "image_uri", "view", "category")
CATALOG_COLUMNS: tuple[str, ...] = (*_ID_COLUMNS, *ATTRIBUTE_COLUMNS)
ATTRIBUTE_VALUES: dict[str, tuple[str, ...]] = {
    "colour": tuple(COLOURS),
    "pattern": PATTERNS,
    "sleeve_length": SLEEVE_LENGTHS,
}

_SLEEVES = {"tshirt": ("short", "short", "short", "none"), "longsleeve": ("long",), "jacket": ("long",)}
_SLEEVES["dress"] = SLEEVE_LENGTHS
_DETAILS = {
    "tshirt": ("logo", "pocket", "band", "trim"),
    "longsleeve": ("logo", "pocket", "buttons", "band", "trim"),
    "dress": ("logo", "buttons", "band", "trim"),
    "jacket": ("pocket", "buttons", "logo", "trim"),
    "trousers": ("pocket", "band", "trim", "logo"),
    "shorts": ("pocket", "band", "trim", "logo"),
    "skirt": ("band", "trim", "buttons", "logo"),
    "hat": ("logo", "trim", "band"),
}
_VARIANTS = {"trousers": ("slim", "straight", "wide"), "skirt": ("aline", "pencil", "pleated")}
_VARIANTS["hat"] = ("cap", "bucket", "beanie")
_SKIN = ((224, 172, 135), (198, 134, 94), (141, 85, 54), (241, 194, 160), (95, 60, 40))
Point = tuple[float, float]


@dataclass(frozen=True)
class SyntheticConfig:
    """What to generate; the whole config (with GENERATOR_VERSION) keys the on-disk cache."""

    products_per_category: int = 40
    consumer_views: int = 2  # per product, besides the one shop view
    image_size: int = 128  # square images
    seed: int = 0
    jpeg_quality: int = 90  # of the shop views; consumer views draw their own, lower one

    def __post_init__(self) -> None:
        if self.products_per_category < 1 or self.consumer_views < 0:
            raise ValueError("need products_per_category >= 1 and consumer_views >= 0")
        if self.image_size < 32 or not 1 <= self.jpeg_quality <= 95:
            raise ValueError("need image_size >= 32 and 1 <= jpeg_quality <= 95")


@dataclass(frozen=True)
class Product:
    """One catalog product: its labels plus every parameter its rendering needs."""

    product_id: str
    category: str
    colour: str
    pattern: str
    sleeve_length: str
    rgb: tuple[int, int, int]
    secondary_rgb: tuple[int, int, int]  # pattern colour
    accent_rgb: tuple[int, int, int]  # logo / trim / button colour
    details: tuple[str, ...] = ()
    shape: dict[str, float | str] = field(default_factory=dict)

    @property
    def attributes(self) -> dict[str, str]:
        return {"colour": self.colour, "pattern": self.pattern, "sleeve_length": self.sleeve_length}


@dataclass
class _Geometry:
    polys: list[list[Point]]  # filled garment parts, all in [0, 1] canvas units
    seams: list[list[Point]]  # polylines drawn in the outline colour
    panel: tuple[float, float, float, float]  # box where logos, pockets and buttons go
    trim: tuple[float, float | None]  # y-range of the contrast trim band; None: a band along the hem


def _jitter(rgb: tuple[int, int, int], rng: np.random.Generator, sd: float) -> tuple[int, int, int]:
    return tuple(int(v) for v in np.clip(np.array(rgb) + rng.normal(0.0, sd, 3), 0, 255).round())


def sample_product(index: int, seed: int = 0) -> Product:
    """Draws product ``index`` of the catalog for ``seed``; independent of every other product.

    Args:
        index: global product index; its category is ``CATEGORIES[index % len(CATEGORIES)]``.
        seed: catalog seed.

    Returns:
        The product, fully parameterised (rendering it needs no further product-level randomness).
    """
    rng = np.random.default_rng([seed, index, 0])
    category = CATEGORIES[index % len(CATEGORIES)]
    names = list(COLOURS)
    colour = names[rng.integers(len(names))]
    others = [n for n in names if n != colour]
    base = COLOURS[colour]
    if rng.random() < 0.4:  # tonal pattern: lighter on dark garments, darker on light ones
        lum = 0.3 * base[0] + 0.59 * base[1] + 0.11 * base[2]
        tone = [v + (255 - v) * 0.6 if lum < 110 else v * 0.5 for v in base]
        secondary = _jitter(tuple(int(v) for v in tone), rng, 6)
    else:
        secondary = _jitter(COLOURS[others[rng.integers(len(others))]], rng, 8)
    sleeves = _SLEEVES.get(category, ("none",))
    u, variants = rng.uniform, _VARIANTS.get(category, ("plain",))
    shape: dict[str, float | str] = {
        "width": u(0.85, 1.15), "length": u(0.88, 1.12), "flare": u(0.0, 1.0), "slope": u(0.0, 1.0),
        "neck": ("crew", "v", "scoop", "boat")[rng.integers(4)], "neck_w": u(0.05, 0.085),
        "neck_d": u(0.03, 0.06),
        "hem": ("straight", "curved", "angled", "wavy")[rng.integers(4)], "hem_amp": u(0.015, 0.04),
        "sleeve_angle": u(0.0, 1.0), "sleeve_len": u(0.0, 1.0), "sleeve_w": u(0.09, 0.13),
        "variant": variants[rng.integers(len(variants))],
        "side": float(rng.choice([-1.0, 1.0])), "shade": u(0.06, 0.2),
        "period": u(0.05, 0.11), "angle": float(rng.choice([0, 90, 45, 135]) + rng.normal(0, 6)),
        "phase": u(0.0, 1.0), "duty": u(0.15, 0.3),
        "logo": ("circle", "square", "triangle", "diamond", "star", "hexagon")[rng.integers(6)],
        "logo_x": u(0, 1), "logo_y": u(0, 1), "logo_size": u(0.14, 0.26), "logo_rot": u(0, 360),
        "logo_two_tone": u(0, 1), "pocket_x": u(0, 1), "pocket_y": u(0, 1), "pocket_w": u(0.22, 0.38),
        "pocket_aspect": u(0.7, 1.2), "buttons_n": u(0, 1), "band_y": u(0, 1), "band_h": u(0.03, 0.06),
    }  # fmt: skip
    pool = _DETAILS[category]
    n_details = 1 + int(rng.random() < 0.6)
    details = tuple(sorted(pool[i] for i in rng.choice(len(pool), n_details, replace=False)))
    return Product(
        product_id=f"p{index:06d}",
        category=category,
        colour=colour,
        pattern=PATTERNS[rng.integers(len(PATTERNS))],
        sleeve_length=sleeves[rng.integers(len(sleeves))],
        rgb=_jitter(base, rng, 10),
        secondary_rgb=secondary,
        accent_rgb=_jitter(COLOURS[others[rng.integers(len(others))]], rng, 8),
        details=details,
        shape=shape,
    )


# ----------------------------------------------------------------------------------------- geometry
def _arc(cx: float, cy: float, rx: float, ry: float, t0: float, t1: float, n: int) -> list[Point]:
    return [(cx + rx * math.cos(t), cy + ry * math.sin(t)) for t in np.linspace(t0, t1, n).tolist()]


def _mirror(points: list[Point], cx: float = 0.5) -> list[Point]:
    return [(2 * cx - x, y) for x, y in reversed(points)]


def _hem(kind: str, cx: float, y: float, hw: float, amp: float) -> list[Point]:
    """Hem points from the right end to the left end."""
    xs = np.linspace(1.0, -1.0, 9).tolist()
    if kind == "curved":
        return [(cx + hw * x, y + amp * (1 - x * x)) for x in xs]
    if kind == "angled":
        return [(cx + hw, y - amp), (cx - hw, y + amp)]
    if kind == "wavy":
        xs = np.linspace(1.0, -1.0, 17).tolist()
        return [(cx + hw * x, y + 0.5 * amp * math.sin(4 * math.pi * x)) for x in xs]
    return [(cx + hw, y), (cx - hw, y)]


def _top_geometry(p: Product) -> _Geometry:
    sh, cx, top = p.shape, 0.5, 0.1
    jacket, dress = p.category == "jacket", p.category == "dress"
    w = 0.19 * sh["width"] * (1.1 if jacket else 1.0)
    sd, arm = 0.025 + 0.025 * sh["slope"], 0.13
    nw, nd = sh["neck_w"], sh["neck_d"]
    neck = "v" if jacket else sh["neck"]
    if neck == "v":
        neck_pts = [(cx - nw, top), (cx, top + nd * (4.0 if jacket else 2.2)), (cx + nw, top)]
    else:
        depth, wide = {"crew": (nd, 1.0), "scoop": (2 * nd, 1.15), "boat": (0.4 * nd, 1.6)}[neck]
        neck_pts = _arc(cx, top, nw * wide, depth, math.pi, 0.0, 9)
    sleeveless = p.sleeve_length == "none"
    sx, arm_y = (w * 0.62 if sleeveless else w + 0.012), top + sd + arm
    right = [(cx + sx, top + sd)] + ([(cx + w * 0.8, top + sd + arm * 0.6)] if sleeveless else [])
    right.append((cx + w, arm_y))
    if dress:
        waist, hem = top + 0.3 * sh["length"], top + 0.8 * sh["length"]
        hem_hw = w * (1.25 + 0.8 * sh["flare"])
        right.append((cx + w * 0.85, waist))
    else:
        hem = top + (0.7 if jacket else 0.62) * sh["length"]
        hem_hw = w * (1.0 + 0.08 * sh["flare"])
    hem_kind = "straight" if jacket else sh["hem"] if dress or sh["hem"] != "wavy" else "curved"
    body = neck_pts + right + _hem(hem_kind, cx, hem, hem_hw, sh["hem_amp"]) + _mirror(right, cx)
    polys, seams = [], []
    if not sleeveless:
        s, a = right[0], right[-2] if dress else right[-1]
        if p.sleeve_length == "short":
            theta, length = math.radians(28 + 20 * sh["sleeve_angle"]), 0.11 + 0.05 * sh["sleeve_len"]
        else:
            theta, length = math.radians(62 + 12 * sh["sleeve_angle"]), 0.4 + 0.06 * sh["sleeve_len"]
        mx, my = (s[0] + a[0]) / 2, (s[1] + a[1]) / 2
        ex, ey = mx + length * math.cos(theta), my + length * math.sin(theta)
        cw = sh["sleeve_w"] / 2 * (0.8 if p.sleeve_length == "long" else 1.0)
        up = (cw * math.sin(theta), -cw * math.cos(theta))
        sleeve = [s, (ex + up[0], ey + up[1]), (ex - up[0], ey - up[1]), a]
        polys += [sleeve, _mirror(sleeve, cx)]
        if p.sleeve_length == "long":  # cuff seam
            cuff = [(ex + up[0] * 1.1 - 0.04 * math.cos(theta), ey + up[1] * 1.1 - 0.04 * math.sin(theta))]
            cuff.append((cuff[0][0] - 2.2 * up[0], cuff[0][1] - 2.2 * up[1]))
            seams += [cuff, _mirror(cuff, cx)]
    polys.append(body)
    if jacket:
        seams.append([(cx, top + nd * 4.0), (cx, hem)])
        lapel = [(cx - nw, top), (cx - nw - 0.05, top + 0.13), (cx - 0.004, top + nd * 4.0)]
        seams += [lapel, _mirror(lapel, cx)]
    if dress:
        seams.append([(cx - w * 0.85, waist), (cx + w * 0.85, waist)])
    y1 = min(hem - 0.04, (waist if dress else arm_y + 0.24))
    return _Geometry(polys, seams, (cx - w * 0.65, top + 0.13, cx + w * 0.65, y1), (hem - 0.1, None))


def _bottom_geometry(p: Product) -> _Geometry:
    sh, cx, top, wb = p.shape, 0.5, 0.08, 0.035
    ww = 0.16 * sh["width"]
    if p.category == "skirt":
        var, flare = sh["variant"], sh["flare"]
        hw = ww + {"aline": 0.1 + 0.1 * flare, "pencil": 0.02 + 0.03 * flare}.get(var, 0.08 + 0.08 * flare)
        hem = top + wb + 0.5 * sh["length"]
        body = [(cx - ww, top + wb), (cx + ww, top + wb)] + _hem(sh["hem"], cx, hem, hw, sh["hem_amp"])
        seams = [[(cx - ww + 2 * ww * k / 6, top + wb), (cx - hw + 2 * hw * k / 6, hem)] for k in range(1, 6)]
        panel, trim_y = (cx - ww, top + wb + 0.03, cx + ww, top + 0.6 * (hem - top)), hem - 0.1
        seams = seams if var == "pleated" else []
    else:
        crotch, hipy = top + 0.28, top + 0.14
        if p.category == "trousers":
            hem = top + 0.84 * sh["length"]
            out, gap = ww + {"slim": -0.035, "straight": 0.0}.get(sh["variant"], 0.06), 0.025
        else:
            hem, out, gap = crotch + 0.15 * sh["length"], ww + 0.03 + 0.04 * sh["flare"], 0.012
        right = [(cx + ww, top + wb), (cx + ww + 0.012, hipy), (cx + out, hem), (cx + gap, hem)]
        body = right + [(cx, crotch)] + _mirror(right, cx)
        pocket = [(cx + ww - 0.07, top + wb), (cx + ww + 0.004, hipy - 0.03)]
        seams = [[(cx, top + wb), (cx, crotch - 0.05)], pocket, _mirror(pocket, cx)]
        panel, trim_y = (cx - ww + 0.02, top + wb + 0.04, cx + ww - 0.02, crotch), hem - 0.08
    band = [(cx - ww, top), (cx + ww, top), (cx + ww, top + wb), (cx - ww, top + wb)]
    return _Geometry([body, band], seams, panel, (trim_y, None))


def _hat_geometry(p: Product) -> _Geometry:
    sh, cx, base = p.shape, 0.5, 0.62
    var = sh["variant"]
    rx, ry = 0.25 * sh["width"], 0.24 * sh["length"] * (1.3 if var == "beanie" else 1.0)
    polys = [_arc(cx, base, rx, ry, math.pi, 2 * math.pi, 17)]
    seams: list[list[Point]] = []
    if var == "cap":
        s = sh["side"]
        visor = [(cx - 0.2 * rx * s, base - 0.01), (cx + rx * s, base - 0.01)]
        visor.append((cx + (rx + 0.2) * s, base + 0.04))
        visor += [(cx + (rx + 0.13) * s, base + 0.085), (cx - 0.1 * rx * s, base + 0.05)]
        polys.append(visor)
        seams = [[(cx, base - ry), (cx + k * rx, base)] for k in (-0.5, 0.5)]
        polys.append(_arc(cx, base - ry, 0.02, 0.015, 0.0, 2 * math.pi, 10))
    elif var == "bucket":
        bw = rx + 0.09 + 0.06 * sh["flare"]
        polys.append([(cx - rx, base - 0.01), (cx + rx, base - 0.01), (cx + bw, base + 0.09)])
        polys[-1].append((cx - bw, base + 0.09))
    else:
        polys.append([(cx - rx - 0.01, base - 0.02), (cx + rx + 0.01, base - 0.02)])
        polys[-1] += [(cx + rx + 0.01, base + 0.1), (cx - rx - 0.01, base + 0.1)]
        polys.append(_arc(cx, base - ry, 0.055, 0.05, 0.0, 2 * math.pi, 16))
        seams = [[(cx + k * rx / 5, base - 0.02), (cx + k * rx / 5, base + 0.1)] for k in range(-4, 5)]
    panel = (cx - rx * 0.55, base - ry * 0.7, cx + rx * 0.55, base - 0.03)
    return _Geometry(polys, seams, panel, (base - 0.075, base - 0.025))


def _geometry(p: Product) -> _Geometry:
    """Builds the garment outline and fits it, centred, into 84% of the canvas."""
    if p.category == "hat":
        geo = _hat_geometry(p)
    elif p.category in ("trousers", "shorts", "skirt"):
        geo = _bottom_geometry(p)
    else:
        geo = _top_geometry(p)
    pts = np.array([pt for poly in geo.polys for pt in poly])
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    s, (mx, my) = 0.84 / float((hi - lo).max()), ((lo + hi) / 2).tolist()

    def fit(pts: list[Point]) -> list[Point]:
        return [(0.5 + (x - mx) * s, 0.5 + (y - my) * s) for x, y in pts]

    (x0, y0), (x1, y1) = fit([geo.panel[:2], geo.panel[2:]])
    t0, t1 = (None if y is None else 0.5 + (y - my) * s for y in geo.trim)
    return _Geometry([fit(q) for q in geo.polys], [fit(q) for q in geo.seams], (x0, y0, x1, y1), (t0, t1))


# ---------------------------------------------------------------------------------------- rendering
def _pattern_weight(p: Product, n: int) -> np.ndarray:
    """Per-pixel weight of the secondary colour; the base colour always covers most of the garment."""
    if p.pattern == "solid":
        return np.zeros((n, n), np.float32)
    ys, xs = np.mgrid[0:n, 0:n].astype(np.float32) / n
    a, per, ph = math.radians(p.shape["angle"]), p.shape["period"], p.shape["phase"]
    u = (xs * math.cos(a) + ys * math.sin(a)) / per + ph
    v = (ys * math.cos(a) - xs * math.sin(a)) / per + ph
    fu, fv = u - np.floor(u), v - np.floor(v)
    if p.pattern == "stripes":
        return (fu < p.shape["duty"]).astype(np.float32)
    if p.pattern == "dots":
        return (((fu - 0.5) ** 2 + (fv - 0.5) ** 2) < 0.2**2).astype(np.float32)
    if p.pattern == "checks":  # gingham: half-tone bands, full colour where they cross
        return 0.25 * (fu < 0.45) + 0.25 * (fv < 0.45)
    zig = v + 0.8 * np.abs(fu - 0.5)
    return ((zig - np.floor(zig)) < 0.22).astype(np.float32)


def _band_mask(mask: Image.Image, y0: float, y1: float) -> Image.Image:
    band = Image.new("L", mask.size, 0)
    ImageDraw.Draw(band).rectangle([0, y0 * mask.height, mask.width, y1 * mask.height], fill=255)
    return ImageChops.multiply(band, mask)


def _shape_pts(kind: str, cx: float, cy: float, r: float, rot: float) -> list[Point]:
    n = {"circle": 24, "triangle": 3, "square": 4, "diamond": 4, "star": 10, "hexagon": 6}[kind]
    rot = rot + (45.0 if kind == "diamond" else 0.0)
    radii = [r if kind != "star" or k % 2 == 0 else 0.45 * r for k in range(n)]
    angles = [math.radians(rot + 360 * k / n) for k in range(n)]
    return [(cx + rr * math.cos(t), cy + rr * math.sin(t)) for t, rr in zip(angles, radii, strict=True)]


def render_garment(p: Product, size: int) -> Image.Image:
    """Renders the product alone as an RGBA image (alpha = garment), 2x supersampled.

    Args:
        p: the product.
        size: output side in pixels.

    Returns:
        RGBA image of ``size`` x ``size``: centred, upright, transparent around the garment.
    """
    n, geo, sh = 2 * size, _geometry(p), p.shape
    outline = tuple(int(v * 0.5) for v in p.rgb)
    lw = max(2, round(n / 110))

    def px(pts: list[Point]) -> list[Point]:
        return [(x * n, y * n) for x, y in pts]

    mask = Image.new("L", (n, n), 0)
    mdraw = ImageDraw.Draw(mask)
    for poly in geo.polys:
        mdraw.polygon(px(poly), fill=255)
    w = _pattern_weight(p, n)[..., None]
    colour = np.array(p.rgb, np.float32) * (1 - w) + np.array(p.secondary_rgb, np.float32) * w
    xs = np.arange(n, dtype=np.float32) / n - 0.5  # cylinder-like shading so the cloth is not flat
    colour *= (1.0 - sh["shade"] * np.minimum((xs / 0.45) ** 2, 1.0))[None, :, None]
    img = Image.fromarray(colour.clip(0, 255).astype(np.uint8))
    x0, y0, x1, y1 = geo.panel
    if "band" in p.details:
        yb = y0 + (y1 - y0) * sh["band_y"]
        img.paste(p.accent_rgb, (0, 0, n, n), _band_mask(mask, yb, yb + sh["band_h"]))
    if "trim" in p.details:
        trim = _band_mask(mask, geo.trim[0], geo.trim[1] or 1.0)
        if geo.trim[1] is None:  # follow the hem: keep pixels whose point 4.5% lower is off-garment
            shifted = Image.new("L", (n, n), 0)
            shifted.paste(mask.crop((0, round(0.045 * n), n, n)), (0, 0))
            trim = ImageChops.subtract(trim, shifted)
        img.paste(p.accent_rgb, (0, 0, n, n), trim)
    img = Image.composite(img, Image.new("RGB", (n, n), outline), mask)  # no colour halo at the edges
    img.putalpha(mask)
    draw = ImageDraw.Draw(img)
    pw = x1 - x0
    if "pocket" in p.details:
        w_, h_ = pw * sh["pocket_w"], pw * sh["pocket_w"] * sh["pocket_aspect"]
        px0 = x0 + (pw - w_) * sh["pocket_x"]
        py0 = y0 + max(0.0, y1 - y0 - h_) * sh["pocket_y"]
        fill = tuple(int(v * 0.85) for v in p.rgb)
        draw.rectangle(px([(px0, py0), (px0 + w_, py0 + h_)]), fill=fill, outline=outline, width=lw)
        draw.line(px([(px0, py0 + h_ * 0.3), (px0 + w_, py0 + h_ * 0.3)]), fill=outline, width=lw)
    if "buttons" in p.details:
        k = 3 + int(sh["buttons_n"] * 3)
        for i in range(k):
            by, r = y0 + (y1 - y0) * (i + 0.5) / k, 0.013
            draw.ellipse(px([((x0 + x1) / 2 - r, by - r), ((x0 + x1) / 2 + r, by + r)]), fill=p.accent_rgb)
    if "logo" in p.details:
        r = pw * sh["logo_size"] / 2
        lx = x0 + r + max(0.0, pw - 2 * r) * sh["logo_x"]
        ly = y0 + r + max(0.0, y1 - y0 - 2 * r) * sh["logo_y"]
        draw.polygon(px(_shape_pts(sh["logo"], lx, ly, r, sh["logo_rot"])), fill=p.accent_rgb)
        if sh["logo_two_tone"] > 0.5:
            draw.polygon(px(_shape_pts(sh["logo"], lx, ly, r * 0.5, sh["logo_rot"])), fill=p.secondary_rgb)
    for poly in geo.polys:
        draw.polygon(px(poly), outline=outline, width=lw)
    for seam in geo.seams:
        draw.line(px(seam), fill=outline, width=lw)
    return img.reduce(2)


def _matmul(a: list[list[float]], b: list[list[float]]) -> list[list[float]]:
    # Pure-Python 3x3 algebra: BLAS kernels may differ in the last bit between CPUs.
    return [[sum(a[i][k] * b[k][j] for k in range(3)) for j in range(3)] for i in range(3)]


def _inverse(m: list[list[float]]) -> list[list[float]]:
    def cof(i: int, j: int) -> float:
        return (
            m[(j + 1) % 3][(i + 1) % 3] * m[(j + 2) % 3][(i + 2) % 3]
            - m[(j + 1) % 3][(i + 2) % 3] * m[(j + 2) % 3][(i + 1) % 3]
        )

    c = [[cof(i, j) for j in range(3)] for i in range(3)]  # adjugate
    det = sum(m[0][k] * c[k][0] for k in range(3))
    return [[v / det for v in row] for row in c]


def _background(size: int, rng: np.random.Generator) -> Image.Image:
    """Street clutter: colour gradient, blotchy texture and random translucent shapes."""
    c1, c2 = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    a = rng.uniform(0, 2 * math.pi)
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) / size
    t = ((xs - 0.5) * math.cos(a) + (ys - 0.5) * math.sin(a) + 0.71) / 1.42
    arr = c1 * (1 - t[..., None]) + c2 * t[..., None]
    blotch = Image.fromarray((128 + rng.normal(0, 30, (6, 6, 3))).clip(0, 255).astype(np.uint8))
    arr += np.asarray(blotch.resize((size, size), Image.Resampling.BICUBIC), np.float32) - 128
    img = Image.fromarray(arr.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img, "RGBA")
    for _ in range(int(rng.integers(4, 12))):
        kind, fill = int(rng.integers(4)), (*rng.integers(0, 256, 3).tolist(), int(rng.integers(90, 256)))
        x0, y0 = (rng.uniform(-0.2, 1.0, 2) * size).tolist()
        w, h = (rng.uniform(0.05, 0.5, 2) * size).tolist()
        if kind == 0:
            draw.ellipse([x0, y0, x0 + w, y0 + h], fill=fill)
        elif kind == 1:
            draw.rectangle([x0, y0, x0 + w, y0 + h], fill=fill)
        elif kind == 2:
            draw.line([x0, y0, x0 + w, y0 + h], fill=fill, width=max(1, int(size * rng.uniform(0.01, 0.05))))
        else:
            u, v = rng.uniform(size=2).tolist()
            draw.polygon([(x0, y0), (x0 + w, y0 + h * u), (x0 + w * v, y0 + h)], fill=fill)
    return img


def _occluder(side: int, rng: np.random.Generator) -> Image.Image:
    """A blob, a hand or a bag on a transparent patch, randomly rotated."""
    patch = Image.new("RGBA", (side, side), (0, 0, 0, 0))
    d, s, kind = ImageDraw.Draw(patch), side, int(rng.integers(3))
    colour = tuple(rng.integers(0, 256, 3).tolist())
    if kind == 0:
        angles = np.sort(rng.uniform(0, 2 * math.pi, 7)).tolist()
        radii = rng.uniform(0.3, 0.5, 7).tolist()
        polar = zip(angles, radii, strict=True)
        pts = [(s * (0.5 + r * math.cos(t)), s * (0.5 + r * math.sin(t))) for t, r in polar]
        d.polygon(pts, fill=colour)
    elif kind == 1:
        skin = _SKIN[int(rng.integers(len(_SKIN)))]
        d.ellipse([0.2 * s, 0.45 * s, 0.8 * s, s - 1], fill=skin)
        for k in range(4):
            fx = 0.22 * s + k * 0.14 * s
            top = 0.1 * s + abs(k - 1.5) * 0.06 * s  # middle fingers are the longest
            d.rounded_rectangle([fx, top, fx + 0.12 * s, 0.65 * s], 0.06 * s, fill=skin)
        d.ellipse([0.02 * s, 0.4 * s, 0.3 * s, 0.6 * s], fill=skin)
    else:
        d.rectangle([0.1 * s, 0.35 * s, 0.9 * s, s - 1], fill=colour)
        d.arc([0.28 * s, 0.05 * s, 0.72 * s, 0.65 * s], 180, 360, fill=colour, width=max(2, s // 12))
    return patch.rotate(float(rng.uniform(0, 360)), Image.Resampling.BILINEAR, expand=True)


def _consumer_view(garment: Image.Image, rng: np.random.Generator) -> tuple[Image.Image, int]:
    """A street photo of the garment; returns the image and the JPEG quality to save it at."""
    size = garment.width
    c = size / 2
    a, s, k = math.radians(rng.uniform(-25, 25)), rng.uniform(0.7, 1.25), rng.uniform(-0.15, 0.15)
    tx, ty = (rng.uniform(-0.16, 0.16, 2) * size).tolist()
    p1, p2 = (rng.uniform(-0.3, 0.3, 2) / c).tolist()  # perspective: w stays within 1 +- 0.6
    m = [[1.0, 0.0, -c], [0.0, 1.0, -c], [p1, p2, 1.0 - (p1 + p2) * c]]  # centre first, then perspective
    m = _matmul([[s, s * k, 0.0], [0.0, s, 0.0], [0.0, 0.0, 1.0]], m)
    m = _matmul([[math.cos(a), -math.sin(a), c + tx], [math.sin(a), math.cos(a), c + ty], [0.0, 0.0, 1.0]], m)
    inv = _inverse(m)
    coeffs = [v / inv[2][2] for row in inv for v in row][:8]
    warped = garment.transform((size, size), Image.Transform.PERSPECTIVE, coeffs, Image.Resampling.BILINEAR)
    img = _background(size, rng)
    img.paste(warped, (0, 0), warped)
    alpha = np.asarray(warped.getchannel("A"))
    bbox, area = warped.getchannel("A").getbbox(), int((alpha > 127).sum())
    if bbox and area and rng.random() < 0.65:
        for frac in rng.uniform(0.05, 0.13, int(rng.integers(1, 3))).tolist():
            side = max(4, int(math.sqrt(frac * area / 0.6)))  # shapes fill ~60% of their patch
            occ = _occluder(side, rng)
            ox, oy = rng.uniform(bbox[0], bbox[2]), rng.uniform(bbox[1], bbox[3])
            img.paste(occ, (int(ox - occ.width / 2), int(oy - occ.height / 2)), occ)
    arr = np.asarray(img, np.float32)
    contrast, bright, cast = rng.uniform(0.75, 1.15), rng.uniform(-25, 25), rng.uniform(0.9, 1.1, 3)
    arr = ((arr - 128) * contrast + 128 + bright) * cast.astype(np.float32)
    if rng.random() < 0.5:  # gradient shadow
        b = rng.uniform(0, 2 * math.pi)
        ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) / size
        t = np.clip((xs - 0.5) * math.cos(b) + (ys - 0.5) * math.sin(b) + 0.5, 0, 1)
        arr *= (1 - rng.uniform(0.15, 0.35) * t)[..., None]
    r = rng.random()
    if r < 0.35:
        arr += rng.normal(0, rng.uniform(3, 9), arr.shape).astype(np.float32)
    img = Image.fromarray(arr.clip(0, 255).astype(np.uint8))
    if r > 0.65:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.4, 1.1) * size / 128))
    return img, int(rng.integers(60, 86))


def render_product_views(
    product: Product, config: SyntheticConfig, rng: np.random.Generator
) -> list[tuple[str, Image.Image]]:
    """Renders the shop view and ``config.consumer_views`` consumer views of one product.

    Args:
        product: the product, e.g. from ``sample_product``.
        config: image size and number of consumer views.
        rng: randomness of the views (not of the product); seeded per product for determinism.

    Returns:
        ``[("shop", img), ("consumer", img), ...]``, RGB images of ``config.image_size``. A consumer
        image carries the lower JPEG quality it is meant to be saved at in ``img.info["quality"]``.
    """
    garment = render_garment(product, config.image_size)
    level = (int(rng.integers(242, 256)) + rng.integers(-3, 4, 3)).clip(0, 255)  # near-white, tiny tint
    shop = Image.new("RGB", garment.size, tuple(level.tolist()))
    shop.paste(garment, (0, 0), garment)
    views = [("shop", shop)]
    for _ in range(config.consumer_views):
        img, quality = _consumer_view(garment, rng)
        img.info["quality"] = quality
        views.append(("consumer", img))
    return views


# ------------------------------------------------------------------------------------------ catalog
def _atomic_write(path: pathlib.Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8", newline="")
    os.replace(tmp, path)


def generate_catalog(
    out_dir: str | os.PathLike, config: SyntheticConfig = SyntheticConfig(), *, progress: bool = False
) -> pathlib.Path:
    """Writes ``out_dir/images/<item_id>.jpg`` and ``out_dir/catalog.csv`` (unless already there).

    Args:
        out_dir: output folder, created if needed.
        config: what to generate; a catalog made with the same config and generator version is reused.
        progress: print progress to stderr.

    Returns:
        Path of ``catalog.csv``, whose ``image_uri`` values are relative to its folder.
    """
    out = pathlib.Path(out_dir)
    catalog, marker = out / "catalog.csv", out / ".synthetic.json"
    stamp = json.dumps({"generator_version": GENERATOR_VERSION, "config": asdict(config)}, sort_keys=True)
    if catalog.is_file() and marker.is_file() and marker.read_text(encoding="utf-8") == stamp:
        return catalog
    # A stale catalog must not outlive a regeneration that gets interrupted half-way.
    catalog.unlink(missing_ok=True)
    marker.unlink(missing_ok=True)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rows, total = [], len(CATEGORIES) * config.products_per_category
    for index in range(total):
        product = sample_product(index, config.seed)
        views = render_product_views(product, config, np.random.default_rng([config.seed, index, 1]))
        for k, (view, img) in enumerate(views):
            item_id = f"{product.product_id}-{'shop' if view == 'shop' else f'c{k}'}"
            uri = f"images/{item_id}.jpg"
            img.save(out / uri, "JPEG", quality=img.info.get("quality", config.jpeg_quality))
            labels = [product.attributes[c] for c in ATTRIBUTE_COLUMNS]
            rows.append((item_id, product.product_id, uri, view, product.category, *labels))
        if progress and ((index + 1) % max(1, total // 10) == 0 or index + 1 == total):
            print(f"synthetic: {index + 1}/{total} products", file=sys.stderr)
    rows.sort()
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CATALOG_COLUMNS)
    writer.writerows(rows)
    _atomic_write(marker, stamp)
    _atomic_write(catalog, buf.getvalue())  # last: its presence means every image is on disk
    return catalog


def main(argv: list[str] | None = None) -> None:
    """CLI: ``python -m retrieval_core.data.synthetic --out DIR [options]``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output folder")
    defaults = SyntheticConfig()
    for name in ("products_per_category", "consumer_views", "image_size", "seed"):
        parser.add_argument(f"--{name}", type=int, default=getattr(defaults, name))
    args = parser.parse_args(argv)
    config = SyntheticConfig(args.products_per_category, args.consumer_views, args.image_size, args.seed)
    start = time.perf_counter()
    path = generate_catalog(args.out, config, progress=True)
    with path.open(newline="", encoding="utf-8") as f:
        n_images = sum(1 for _ in csv.DictReader(f))
    print(f"{n_images} images, catalog {path} ({time.perf_counter() - start:.1f}s)")


if __name__ == "__main__":
    main()
