"""Image decoding and model preprocessing, shared by the pipeline, training and the searcher.

``decode_image`` turns untrusted bytes into an RGB ``uint8`` array of the size a
bundle expects, or raises ``DecodeError`` with a short machine-readable
``error_type``; it never lets a PIL exception of another kind escape, so one bad
image can only ever cost its own row. ``Preprocessing`` travels inside every
model bundle so the pipeline, the training job and the searcher cannot disagree.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

# Never accept a truncated file as if it were whole: it must become a dead-letter row.
ImageFile.LOAD_TRUNCATED_IMAGES = False

_EXIF_ORIENTATION = 0x0112
_SWAPS_AXES = {5, 6, 7, 8}  # EXIF orientations that rotate by 90 or 270 degrees
# Magic numbers of JPEG, PNG, GIF and TIFF: bytes that start this way are an image, even if PIL cannot open them.
_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"II*\x00", b"MM\x00*")


@dataclass(frozen=True)
class Preprocessing:
    """How a bundle wants its input: size, normalisation and resize policy.

    Attributes:
        image_size: side of the square model input, in pixels.
        mean: per-channel mean of the [0, 1] RGB input.
        std: per-channel standard deviation.
        resize: ``"letterbox"`` keeps the aspect ratio and pads; ``"stretch"`` ignores it.
        pad_value: grey level of the letterbox padding (catalog photos are mostly on white).
    """

    image_size: int = 64
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.25, 0.25, 0.25)
    resize: str = "letterbox"
    pad_value: int = 255

    def __post_init__(self) -> None:
        if self.resize not in ("letterbox", "stretch"):
            raise ValueError(f"resize must be 'letterbox' or 'stretch', got {self.resize!r}")
        if self.image_size < 8:
            raise ValueError(f"image_size must be >= 8, got {self.image_size}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Preprocessing:
        return cls(**{**d, "mean": tuple(d["mean"]), "std": tuple(d["std"])})


@dataclass(frozen=True)
class DecodeLimits:
    """Bounds on untrusted input; anything outside becomes a dead-letter row, not an OOM."""

    max_bytes: int = 64 * 1024 * 1024
    max_pixels: int = 64_000_000  # width * height as declared in the header, checked before decoding
    min_side: int = 8


class DecodeError(Exception):
    """An image that cannot be used. ``error_type`` is a short stable tag for the dead-letter table."""

    def __init__(self, error_type: str, message: str) -> None:
        super().__init__(message)
        self.error_type = error_type


@dataclass(frozen=True)
class DecodedImage:
    """A decoded image: model-ready pixels plus facts about the original."""

    pixels: np.ndarray  # (H, W, 3) uint8, RGB
    width: int  # of the original, after EXIF orientation
    height: int
    format: str
    mode: str  # PIL mode of the original


def decode_image(
    data: bytes, prep: Preprocessing | None = None, limits: DecodeLimits | None = None, *, draft: bool = True
) -> DecodedImage:
    """Decode untrusted bytes into RGB pixels, resized for ``prep`` when given.

    Handles EXIF orientation, CMYK, greyscale, palette and alpha (composited on
    white), 16-bit and float images, and animated images (first frame). JPEGs
    are decoded at reduced scale (``draft``) when the target is much smaller.

    Args:
        data: the file's bytes.
        prep: target size and resize policy; ``None`` keeps the original size.
        limits: size bounds.
        draft: allow the reduced-scale JPEG decode. ``False`` decodes every pixel before resizing
            (slower, slightly different pixels); for measuring what the draft path saves.

    Returns:
        The decoded image.

    Raises:
        DecodeError: with ``error_type`` one of ``empty``, ``too_large``, ``not_an_image``,
            ``decompression_bomb``, ``too_small``, ``truncated``, ``corrupt``.
    """
    limits = limits or DecodeLimits()
    if not data:
        raise DecodeError("empty", "zero bytes")
    if len(data) > limits.max_bytes:
        raise DecodeError("too_large", f"{len(data)} bytes exceeds the limit of {limits.max_bytes}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError as e:
        if data.startswith(_SIGNATURES):  # a known format whose header is cut off or damaged
            raise DecodeError("corrupt", f"unreadable image header ({_head(data)})") from e
        raise DecodeError("not_an_image", f"not a recognised image format ({_head(data)})") from e
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DecodeError("decompression_bomb", str(e)) from e
    except Exception as e:  # PIL raises many types on malformed headers
        raise DecodeError(_failure_kind(e), f"{type(e).__name__}: {e}") from e

    fmt, mode = img.format or "unknown", img.mode
    w, h = img.size
    if w * h > limits.max_pixels:
        raise DecodeError("decompression_bomb", f"{w}x{h} = {w * h} pixels exceeds the limit of {limits.max_pixels}")
    try:
        orientation = int(img.getexif().get(_EXIF_ORIENTATION, 1))
    except Exception:  # a broken EXIF block should not cost the image
        orientation = 1
    orig_w, orig_h = (h, w) if orientation in _SWAPS_AXES else (w, h)
    if min(orig_w, orig_h) < limits.min_side:
        raise DecodeError("too_small", f"{orig_w}x{orig_h} is smaller than {limits.min_side} px on a side")

    try:
        if draft and fmt == "JPEG" and prep is not None and mode in ("RGB", "L", "CMYK"):
            # Decode at 1/2, 1/4 or 1/8 scale when that still covers the target: several times faster.
            img.draft(img.mode, (prep.image_size, prep.image_size))
        img.load()
        if orientation != 1:
            img = ImageOps.exif_transpose(img)
        rgb = _to_rgb(img)
    except DecodeError:
        raise
    except Exception as e:
        raise DecodeError(_failure_kind(e), f"{type(e).__name__}: {e}") from e

    if prep is not None:
        rgb = resize_for_model(rgb, prep)
    return DecodedImage(np.asarray(rgb, dtype=np.uint8), orig_w, orig_h, fmt, mode)


def _failure_kind(e: Exception) -> str:
    text = str(e).lower()
    truncated = isinstance(e, OSError) and ("truncated" in text or "broken data stream" in text)
    return "truncated" if truncated else "corrupt"


def _head(data: bytes) -> str:
    return "starts with " + repr(data[:16])


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode to RGB; transparency is composited on white, high bit depths are scaled down."""
    if img.mode == "RGB":
        return img
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        peak = float(arr.max()) if arr.size else 0.0
        if img.mode.startswith("I;16") or peak > 255:
            hi = 65535.0
        elif img.mode == "F" and peak <= 1.0:
            hi = 1.0  # float images are usually in [0, 1]
        else:
            hi = 255.0
        arr = np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def resize_for_model(img: Image.Image, prep: Preprocessing) -> Image.Image:
    """Resize to the square model input, keeping the aspect ratio when ``prep.resize == 'letterbox'``."""
    size = prep.image_size
    if prep.resize == "stretch":
        return img.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=3.0)
    w, h = img.size
    scale = size / max(w, h)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    resized = img.resize((nw, nh), Image.Resampling.BILINEAR, reducing_gap=3.0) if (nw, nh) != (w, h) else img
    if (nw, nh) == (size, size):
        return resized
    canvas = Image.new("RGB", (size, size), (prep.pad_value,) * 3)
    canvas.paste(resized, ((size - nw) // 2, (size - nh) // 2))
    return canvas


def resize_long_side(img: Image.Image, long_side: int) -> Image.Image:
    """Resize so that the longer side is ``long_side`` pixels, keeping the aspect ratio (no padding)."""
    if long_side < 1:
        raise ValueError(f"long_side must be >= 1, got {long_side}")
    w, h = img.size
    scale = long_side / max(w, h)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return img if size == (w, h) else img.resize(size, Image.Resampling.BILINEAR, reducing_gap=3.0)


def to_model_input(pixels: np.ndarray, prep: Preprocessing) -> np.ndarray:
    """Stack of (N, H, W, 3) uint8 pixels -> (N, 3, H, W) float32, normalised by the bundle's mean and std."""
    x = np.asarray(pixels, dtype=np.float32) / 255.0
    if x.ndim == 3:
        x = x[None]
    x = (x - np.asarray(prep.mean, np.float32)) / np.asarray(prep.std, np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def load_image_file(path: str, prep: Preprocessing | None = None, limits: DecodeLimits | None = None) -> DecodedImage:
    """Read and decode one local or remote (Beam filesystem) image."""
    from retrieval_core.io import read_bytes

    return decode_image(read_bytes(path), prep, limits)
