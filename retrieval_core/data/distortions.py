"""The one recipe of seeded "consumer view" distortions, shared by every method that needs a query view.

A shop photo becomes what a customer's phone might show of the same garment: reframed (crop, zoom-out),
tilted (rotation, perspective), under other light (white balance, brightness, contrast, saturation, hue,
an illumination gradient), partly covered (a hand, a bag, a strap) and re-compressed as a JPEG.

Resolution: the recipe's strengths (JPEG's 8x8 blocks, an occluder's grain, the blur of one resampling) are
those of a phone photo, so it is applied at one working resolution, :data:`WORKING_LONG_SIDE`: the photo at
its own aspect ratio with its longer side that many pixels (as ``real_photos.decode_photos_long_side``
decodes it), never to a model's small letterboxed input, whose padding bars would be tinted and moved in
queries only. The view is then preprocessed like any photo (resized and letterboxed to the
model's input), so every method and every image size meets the same views
(``retrieval_core.data.product_retrieval.consumer_view``). The output has the input's size and dtype.

Every view is a pure function of ``(seed, key, recipe)``: the generator is seeded from
``sha256(f"{seed}:{key}")`` (Python's ``hash()`` changes between processes), and every parameter is drawn in a
fixed order whether or not its step is enabled, so switching one step off leaves the others' parameters as
they were.

Order: geometry, occlusion (after it, so the bound on the covered area holds in the output), colour (the
occluder is under the same light as the garment), JPEG. The four geometric steps are composed into one
projective transform and resampled once; four successive resamplings would blur the picture noticeably more
than any phone does.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image

WORKING_LONG_SIDE = 256
"""Longer side, in pixels, of the photos the recipe is applied to (a phone photo as shared online, downscaled)."""
OCCLUDER_KINDS: tuple[str, ...] = ("solid", "skin", "copy")
# Plausible skin tones (RGB), light to dark: a hand or an arm in front of the garment.
_SKIN_TONES = np.array(
    [[241, 194, 167], [224, 172, 138], [198, 134, 103], [161, 102, 72], [117, 72, 48], [84, 52, 36]], dtype=np.float64
)


def _check_range(name: str, bounds: tuple[float, float], low: float, high: float) -> None:
    lo, hi = bounds
    if not low <= lo <= hi <= high:
        raise ValueError(f"{name} must satisfy {low} <= min <= max <= {high}, got {bounds}")


@dataclass(frozen=True)
class DistortionRecipe:
    """Which distortions to apply and how strong they may be; every range is sampled uniformly.

    The defaults aim at a realistic consumer photo of the same garment that still shows it: at least 60%
    of the picture kept, at most 15 degrees of tilt, at most 20% of the picture covered.

    Attributes:
        crop: reframe to a window of the picture, resized back to full size (the garment looks closer).
        crop_area: share of the picture's area the window keeps.
        crop_aspect: window aspect ratio relative to the picture's (a mild stretch after the resize).
        rotation: tilt the camera.
        max_rotation_deg: largest tilt, either way.
        perspective: a camera not facing the garment square on: each corner moves independently.
        max_perspective: largest corner shift, as a share of the side.
        scale: zoom out: the picture shrinks to ``scale`` of each side at a random place on the background.
        scale_range: the shrink factor of each side.
        colour: change white balance, brightness, contrast, saturation, hue and add a lighting gradient.
        white_balance: per-channel gain (a warm or cold light).
        brightness: gain on every channel.
        contrast: factor on the distance from the mean grey level.
        saturation: factor on the distance from the pixel's own grey level.
        max_hue_deg: largest rotation of the hue, about the grey axis, either way.
        max_light_gradient: light falls off linearly across the picture in a random direction, from
            ``1 + g`` to ``1 - g`` times the light at the centre; ``g`` is at most this.
        occlusion: cover a rectangle, with probability ``occlusion_prob``.
        occlusion_prob: chance that a view is occluded at all.
        occlusion_area: share of the picture's area the rectangle covers (rounding only shrinks it).
        occlusion_aspect: width / height of the rectangle.
        occluder_kinds: what covers it: ``"solid"`` an object of a random colour with a little texture,
            ``"skin"`` a hand (a skin tone with shading), ``"copy"`` another part of the same picture.
        jpeg: re-encode as JPEG and decode again, as a phone, a chat app or an upload form would.
        jpeg_quality: JPEG quality, integers from min to max inclusive.
    """

    crop: bool = True
    crop_area: tuple[float, float] = (0.6, 1.0)
    crop_aspect: tuple[float, float] = (0.8, 1.25)
    rotation: bool = True
    max_rotation_deg: float = 15.0
    perspective: bool = True
    max_perspective: float = 0.08
    scale: bool = True
    scale_range: tuple[float, float] = (0.8, 1.0)
    colour: bool = True
    white_balance: tuple[float, float] = (0.9, 1.1)
    brightness: tuple[float, float] = (0.75, 1.25)
    contrast: tuple[float, float] = (0.75, 1.25)
    saturation: tuple[float, float] = (0.7, 1.3)
    max_hue_deg: float = 10.0
    max_light_gradient: float = 0.2
    occlusion: bool = True
    occlusion_prob: float = 0.5
    occlusion_area: tuple[float, float] = (0.03, 0.2)
    occlusion_aspect: tuple[float, float] = (0.5, 2.0)
    occluder_kinds: tuple[str, ...] = OCCLUDER_KINDS
    jpeg: bool = True
    jpeg_quality: tuple[int, int] = (30, 90)

    def __post_init__(self) -> None:
        _check_range("crop_area", self.crop_area, 1e-3, 1.0)
        _check_range("crop_aspect", self.crop_aspect, 1e-3, 1e3)
        _check_range("scale_range", self.scale_range, 1e-3, 1.0)
        _check_range("white_balance", self.white_balance, 0.0, 10.0)
        _check_range("brightness", self.brightness, 0.0, 10.0)
        _check_range("contrast", self.contrast, 0.0, 10.0)
        _check_range("saturation", self.saturation, 0.0, 10.0)
        _check_range("occlusion_area", self.occlusion_area, 0.0, 1.0)
        _check_range("occlusion_aspect", self.occlusion_aspect, 1e-3, 1e3)
        _check_range("jpeg_quality", self.jpeg_quality, 1, 95)
        if not 0.0 <= self.max_rotation_deg <= 180.0:
            raise ValueError(f"max_rotation_deg must be in [0, 180], got {self.max_rotation_deg}")
        if not 0.0 <= self.max_perspective < 0.5:
            raise ValueError(f"max_perspective must be in [0, 0.5), got {self.max_perspective}")
        if not 0.0 <= self.max_hue_deg <= 180.0:
            raise ValueError(f"max_hue_deg must be in [0, 180], got {self.max_hue_deg}")
        if not 0.0 <= self.max_light_gradient < 1.0:
            raise ValueError(f"max_light_gradient must be in [0, 1), got {self.max_light_gradient}")
        if not 0.0 <= self.occlusion_prob <= 1.0:
            raise ValueError(f"occlusion_prob must be in [0, 1], got {self.occlusion_prob}")
        if not self.occluder_kinds or set(self.occluder_kinds) - set(OCCLUDER_KINDS):
            raise ValueError(
                f"occluder_kinds must be a non-empty subset of {OCCLUDER_KINDS}, got {self.occluder_kinds}"
            )

    @classmethod
    def none(cls) -> DistortionRecipe:
        """Every step off: ``distort`` returns the input unchanged. Switch steps back on with ``replace``."""
        return cls(
            crop=False, rotation=False, perspective=False, scale=False, colour=False, occlusion=False, jpeg=False
        )


@dataclass(frozen=True)
class DistortionParams:
    """The parameters one view was made with; a step that is off keeps its drawn values but is not in ``applied``.

    Boxes are ``(x0, y0, x1, y1)``, right and bottom exclusive; geometric boxes are in continuous pixel
    coordinates of the picture they act on.

    Attributes:
        applied: the steps applied, in order.
        perspective_shift: ``(4, 2)`` corner displacements (top-left, top-right, bottom-right, bottom-left),
            in pixels.
        rotation_deg: counter-clockwise tilt.
        crop_box: the window of the rotated picture that becomes the frame.
        scale: shrink factor of each side; ``scale_offset`` is where the shrunk picture's top-left lands.
        scale_offset: ``(x, y)`` in pixels.
        fill: RGB the uncovered background is filled with (the median of the input's border).
        white_balance: per-channel gains.
        brightness: gain.
        contrast: factor.
        saturation: factor.
        hue_deg: hue rotation.
        light_gradient: ``(strength, direction in degrees)``.
        occlusion_box: the covered rectangle in output pixels, or ``None`` when the view is not occluded.
        occluder_kind: one of ``OCCLUDER_KINDS``, or ``None``.
        jpeg_quality: the JPEG quality drawn.
    """

    applied: tuple[str, ...]
    perspective_shift: tuple[tuple[float, float], ...]
    rotation_deg: float
    crop_box: tuple[float, float, float, float]
    scale: float
    scale_offset: tuple[float, float]
    fill: tuple[int, int, int]
    white_balance: tuple[float, float, float]
    brightness: float
    contrast: float
    saturation: float
    hue_deg: float
    light_gradient: tuple[float, float]
    occlusion_box: tuple[int, int, int, int] | None
    occluder_kind: str | None
    jpeg_quality: int


def view_rng(key: object, seed: int = 0) -> np.random.Generator:
    """The generator of one view: seeded from ``sha256(f"{seed}:{key}")``, the same in every process."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:16], "little"))


def distort(
    pixels: np.ndarray,
    key: object,
    seed: int = 0,
    recipe: DistortionRecipe = DistortionRecipe(),
    *,
    return_params: bool = False,
) -> np.ndarray | tuple[np.ndarray, DistortionParams]:
    """One consumer view of a picture, the same for the same ``(seed, key, recipe)``.

    Args:
        pixels: ``(H, W, 3)`` uint8 RGB.
        key: what the view belongs to, e.g. the item id; different keys give independent views.
        seed: the experiment's seed.
        recipe: which steps to apply and their ranges.
        return_params: also return the ``DistortionParams`` drawn.

    Returns:
        ``(H, W, 3)`` uint8, and the parameters when ``return_params``.

    Raises:
        ValueError: ``pixels`` is not an ``(H, W, 3)`` uint8 array.
    """
    if pixels.ndim != 3 or pixels.shape[2] != 3 or pixels.dtype != np.uint8:
        raise ValueError(f"pixels must be (H, W, 3) uint8, got {pixels.shape} {pixels.dtype}")
    h, w = pixels.shape[:2]
    rng = view_rng(key, seed)
    params = _draw(rng, recipe, h, w, _border_median(pixels))
    occluder_rng = np.random.default_rng(rng.integers(2**63))  # drawn last: its use cannot shift the others

    out = pixels
    applied = []
    geometry = _geometry_matrix(params, recipe, h, w)
    if geometry is not None:
        out = _warp(out, geometry, params.fill)
        applied += [s for s in ("perspective", "rotation", "crop", "scale") if getattr(recipe, s)]
    if recipe.occlusion and params.occlusion_box is not None:
        out = _occlude(out, params.occlusion_box, params.occluder_kind, occluder_rng)
        applied.append("occlusion")
    if recipe.colour:
        out = _recolour(out, params)
        applied.append("colour")
    if recipe.jpeg:
        out = jpeg_roundtrip(out, params.jpeg_quality)
        applied.append("jpeg")
    if out is pixels:
        out = pixels.copy()
    if not return_params:
        return out
    occluded = recipe.occlusion and params.occlusion_box is not None
    return out, replace(
        params,
        applied=tuple(applied),
        occlusion_box=params.occlusion_box if occluded else None,
        occluder_kind=params.occluder_kind if occluded else None,
    )


def distort_many(
    pixels: np.ndarray,
    keys: Sequence[object],
    seed: int = 0,
    recipe: DistortionRecipe = DistortionRecipe(),
) -> np.ndarray:
    """``distort`` over a stack: ``(N, H, W, 3)`` uint8 and one key per picture -> ``(N, H, W, 3)`` uint8."""
    if len(keys) != len(pixels):
        raise ValueError(f"{len(pixels)} pictures but {len(keys)} keys")
    out = np.empty_like(pixels)
    for i, key in enumerate(keys):
        out[i] = distort(pixels[i], key, seed, recipe)
    return out


def jpeg_roundtrip(pixels: np.ndarray, quality: int) -> np.ndarray:
    """Encode as a baseline JPEG of ``quality`` and decode again."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=int(quality))
    buffer.seek(0)
    with Image.open(buffer) as img:
        return np.asarray(img.convert("RGB"), dtype=np.uint8)


def _border_median(pixels: np.ndarray) -> tuple[int, int, int]:
    """The picture's background colour, as far as its border tells: what a zoom-out or a tilt uncovers."""
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    return tuple(int(v) for v in np.median(border, axis=0))


def _draw(
    rng: np.random.Generator, r: DistortionRecipe, h: int, w: int, fill: tuple[int, int, int]
) -> DistortionParams:
    """Every parameter, always in this order, so that switching a step off changes no other step's values."""
    shift = rng.uniform(-r.max_perspective, r.max_perspective, size=(4, 2)) * np.array([w, h])
    rotation = float(rng.uniform(-r.max_rotation_deg, r.max_rotation_deg))

    area = rng.uniform(*r.crop_area)
    aspect = np.exp(rng.uniform(np.log(r.crop_aspect[0]), np.log(r.crop_aspect[1])))
    crop_w, crop_h = w * min(1.0, np.sqrt(area * aspect)), h * min(1.0, np.sqrt(area / aspect))
    crop_x, crop_y = rng.uniform() * (w - crop_w), rng.uniform() * (h - crop_h)

    scale = float(rng.uniform(*r.scale_range))
    scale_offset = (float(rng.uniform() * (1 - scale) * w), float(rng.uniform() * (1 - scale) * h))

    white_balance = tuple(float(g) for g in rng.uniform(*r.white_balance, size=3))
    brightness = float(rng.uniform(*r.brightness))
    contrast = float(rng.uniform(*r.contrast))
    saturation = float(rng.uniform(*r.saturation))
    hue = float(rng.uniform(-r.max_hue_deg, r.max_hue_deg))
    gradient = (float(rng.uniform(0.0, r.max_light_gradient)), float(rng.uniform(0.0, 360.0)))

    occluded = rng.uniform() < r.occlusion_prob
    occ_area = rng.uniform(*r.occlusion_area) * h * w
    occ_aspect = np.exp(rng.uniform(np.log(r.occlusion_aspect[0]), np.log(r.occlusion_aspect[1])))
    occ_w = min(w, int(np.sqrt(occ_area * occ_aspect)))  # int() rounds down: the area bound holds
    occ_h = min(h, int(np.sqrt(occ_area / occ_aspect)))
    occ_x, occ_y = int(rng.uniform() * (w - occ_w + 1)), int(rng.uniform() * (h - occ_h + 1))
    kind = r.occluder_kinds[int(rng.integers(len(r.occluder_kinds)))]
    box = (occ_x, occ_y, occ_x + occ_w, occ_y + occ_h) if occluded and occ_w > 0 and occ_h > 0 else None

    quality = int(rng.integers(r.jpeg_quality[0], r.jpeg_quality[1] + 1))
    return DistortionParams(
        applied=(),
        perspective_shift=tuple((float(x), float(y)) for x, y in shift),
        rotation_deg=rotation,
        crop_box=(float(crop_x), float(crop_y), float(crop_x + crop_w), float(crop_y + crop_h)),
        scale=scale,
        scale_offset=scale_offset,
        fill=fill,
        white_balance=white_balance,
        brightness=brightness,
        contrast=contrast,
        saturation=saturation,
        hue_deg=hue,
        light_gradient=gradient,
        occlusion_box=box,
        occluder_kind=kind if box is not None else None,
        jpeg_quality=quality,
    )


def _homography(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The 3x3 projective map taking the four ``src`` points to the four ``dst`` points."""
    rows, rhs = [], []
    for (x, y), (u, v) in zip(src, dst):
        rows.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        rows.append([0, 0, 0, x, y, 1, -v * x, -v * y])
        rhs += [u, v]
    coeffs = np.linalg.solve(np.array(rows, dtype=np.float64), np.array(rhs, dtype=np.float64))
    return np.append(coeffs, 1.0).reshape(3, 3)


def _geometry_matrix(p: DistortionParams, r: DistortionRecipe, h: int, w: int) -> np.ndarray | None:
    """Input-to-output map of the enabled geometric steps (perspective, rotation, crop, zoom-out), or None."""
    m = np.eye(3)
    if r.perspective:
        corners = np.array([[0, 0], [w, 0], [w, h], [0, h]], dtype=np.float64)
        m = _homography(corners, corners + np.array(p.perspective_shift)) @ m
    if r.rotation:
        # Counter-clockwise on screen (y points down), about the centre.
        t = np.deg2rad(p.rotation_deg)
        cx, cy = w / 2, h / 2
        rot = np.array([[np.cos(t), np.sin(t), 0], [-np.sin(t), np.cos(t), 0], [0, 0, 1]])
        m = _translate(cx, cy) @ rot @ _translate(-cx, -cy) @ m
    if r.crop:
        x0, y0, x1, y1 = p.crop_box
        m = np.diag([w / (x1 - x0), h / (y1 - y0), 1.0]) @ _translate(-x0, -y0) @ m
    if r.scale:
        m = _translate(*p.scale_offset) @ np.diag([p.scale, p.scale, 1.0]) @ m
    return None if np.array_equal(m, np.eye(3)) else m


def _translate(x: float, y: float) -> np.ndarray:
    return np.array([[1.0, 0.0, x], [0.0, 1.0, y], [0.0, 0.0, 1.0]])


def _warp(pixels: np.ndarray, forward: np.ndarray, fill: tuple[int, int, int]) -> np.ndarray:
    """Resample once; PIL wants the output-to-input map, normalised so that its last entry is 1."""
    inverse = np.linalg.inv(forward)
    inverse /= inverse[2, 2]
    h, w = pixels.shape[:2]
    img = Image.fromarray(pixels).transform(
        (w, h), Image.Transform.PERSPECTIVE, tuple(inverse.flatten()[:8]), Image.Resampling.BILINEAR, fillcolor=fill
    )
    return np.asarray(img, dtype=np.uint8)


def _occlude(pixels: np.ndarray, box: tuple[int, int, int, int], kind: str, rng: np.random.Generator) -> np.ndarray:
    x0, y0, x1, y1 = box
    bh, bw = y1 - y0, x1 - x0
    h, w = pixels.shape[:2]
    if kind == "copy":
        sx, sy = int(rng.integers(w - bw + 1)), int(rng.integers(h - bh + 1))
        patch = pixels[sy : sy + bh, sx : sx + bw].astype(np.float64)
    else:
        colour = rng.uniform(0, 255, size=3) if kind == "solid" else _SKIN_TONES[rng.integers(len(_SKIN_TONES))]
        # A soft shading ramp plus fine grain: a real object is never one flat colour.
        ramp = np.linspace(1.0 - rng.uniform(0, 0.15), 1.0 + rng.uniform(0, 0.15), bw if rng.uniform() < 0.5 else bh)
        shade = ramp[None, :] if len(ramp) == bw else ramp[:, None]
        patch = colour * shade[..., None] + rng.normal(0.0, 4.0, size=(bh, bw, 3))
    out = pixels.copy()
    out[y0:y1, x0:x1] = np.clip(np.rint(patch), 0, 255).astype(np.uint8)
    return out


_LUMA = np.array([0.299, 0.587, 0.114])


def _recolour(pixels: np.ndarray, p: DistortionParams) -> np.ndarray:
    """White balance, lighting gradient, brightness, contrast, saturation and hue, rounded to uint8 once.

    In order, on each pixel's RGB: ``x = brightness * g * (wb * rgb)`` with ``g`` the lighting gradient there;
    contrast about the mean luma ``L`` of the whole picture, ``x = L + contrast * (x - L)``; saturation about
    the pixel's own luma; hue, a rotation about the grey axis. Every step after the gradient is linear and
    leaves grey grey, so the whole is ``g * (A @ rgb) + (1 - contrast) * L``, computed in one 3x3 product
    (in float32: a 256-pixel view is recoloured about four times faster than step by step in float64; the
    result differs from that by at most one grey level, where a value lies at a rounding boundary).
    """
    h, w = pixels.shape[:2]
    strength, direction = p.light_gradient
    t = np.deg2rad(direction)
    scale = strength / max(np.hypot(w, h) / 2, 1e-9)
    across = (np.arange(w) + 0.5 - w / 2) * np.cos(t) * scale
    down = (np.arange(h) + 0.5 - h / 2) * np.sin(t) * scale
    gain = (1.0 + down[:, None] + across[None, :]).astype(np.float32)  # the lighting gradient g, (h, w)
    wb = np.diag(p.white_balance)
    saturate = p.saturation * np.eye(3) + (1.0 - p.saturation) * np.outer(np.ones(3), _LUMA)
    linear = p.contrast * p.brightness * _hue_rotation(p.hue_deg) @ saturate @ wb
    rgb = pixels.astype(np.float32)
    mean_luma = p.brightness * float(np.mean(gain * (rgb @ (_LUMA * p.white_balance).astype(np.float32))))
    x = rgb @ linear.T.astype(np.float32)
    x *= gain[..., None]
    x += np.float32((1.0 - p.contrast) * mean_luma)
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def _hue_rotation(degrees: float) -> np.ndarray:
    """Rotation of RGB about the grey axis (1, 1, 1): turns the hue, keeps grey grey."""
    t = np.deg2rad(degrees)
    u = np.ones(3) / np.sqrt(3.0)
    cross = np.array([[0, -u[2], u[1]], [u[2], 0, -u[0]], [-u[1], u[0], 0]])
    return np.cos(t) * np.eye(3) + np.sin(t) * cross + (1 - np.cos(t)) * np.outer(u, u)
