"""Reader for the real Fashion-MNIST files (IDX format, gzip-compressed), as Zalando published them.

The four original files come from the operating system (Debian package
``dataset-fashion-mnist``, installed under ``/usr/share/datasets/fashion-mnist``)
or from ``$RETRIEVAL_DATA_DIR/fashion-mnist/`` for users who downloaded them
themselves. Every file is validated (header, type, exact payload length, shapes,
counts, label range) and any problem becomes a ``FashionMNISTError`` that names
the file, says what is wrong and how to get good data. Nothing is ever written.
"""

from __future__ import annotations

import gzip
import math
import zlib
from pathlib import Path

import numpy as np

from retrieval_core.data.paths import dataset_dir

CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
SPLITS: dict[str, str] = {"train": "train", "test": "t10k"}  # split name -> file name prefix
SPLIT_SIZES: dict[str, int] = {"train": 60_000, "test": 10_000}
FILES: tuple[str, ...] = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)
IMAGE_SIDE = 28

HOW_TO_GET = (
    "install it with `make data` (runs `apt-get install dataset-fashion-mnist`) "
    "or put the four original files in $RETRIEVAL_DATA_DIR/fashion-mnist/"
)

_GZIP_MAGIC = b"\x1f\x8b"
_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_CHUNK = 1 << 22


class FashionMNISTError(RuntimeError):
    """Fashion-MNIST data that is missing or unusable; the message names the file and how to get good data."""


def _error(where: str | Path, problem: str) -> FashionMNISTError:
    return FashionMNISTError(f"{where}: {problem}; {HOW_TO_GET}")


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file, gzip-compressed (detected by its magic bytes) or raw.

    Memory is bounded by what the header declares: at most the expected payload
    plus one byte (to detect trailing data) is ever read.

    Args:
        path: the file.

    Returns:
        The array, with the header's shape, in native byte order.

    Raises:
        FashionMNISTError: missing or unreadable file, bad magic, unknown type code,
            truncated or overlong payload, or a damaged gzip stream.
    """
    path = Path(path)
    try:
        with open(path, "rb") as raw:
            compressed = raw.read(2) == _GZIP_MAGIC
            raw.seek(0)
            f = gzip.GzipFile(fileobj=raw, mode="rb") if compressed else raw
            return _parse_idx(f, path)
    except FashionMNISTError:
        raise
    except FileNotFoundError as e:
        raise _error(path, "file not found") from e
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise _error(path, f"damaged gzip stream ({type(e).__name__}: {e})") from e
    except OSError as e:
        raise _error(path, f"cannot read ({type(e).__name__}: {e})") from e


def _read_up_to(f, n: int) -> bytearray:
    """At most ``n`` bytes, in chunks, so a header that lies about the size cannot make us allocate it."""
    buf = bytearray()
    while len(buf) < n:
        chunk = f.read(min(_CHUNK, n - len(buf)))
        if not chunk:
            break
        buf += chunk
    return buf


def _parse_idx(f, path: Path) -> np.ndarray:
    magic = _read_up_to(f, 4)
    if len(magic) < 4:
        raise _error(path, f"truncated header: {len(magic)} bytes, an IDX file starts with 4")
    if magic[0] != 0 or magic[1] != 0:
        raise _error(path, f"not an IDX file: magic starts with {bytes(magic[:2])!r}, expected b'\\x00\\x00'")
    code, ndim = magic[2], magic[3]
    if code not in _DTYPES:
        raise _error(path, f"unknown IDX type code 0x{code:02X}")
    if ndim < 1:
        raise _error(path, "IDX header declares 0 dimensions")
    dims_bytes = _read_up_to(f, 4 * ndim)
    if len(dims_bytes) < 4 * ndim:
        raise _error(path, f"truncated header: {ndim} dimensions declared but the sizes are cut off")
    shape = tuple(int(d) for d in np.frombuffer(bytes(dims_bytes), dtype=">u4"))
    dtype = _DTYPES[code]
    expected = math.prod(shape) * dtype.itemsize
    payload = _read_up_to(f, expected + 1)
    if len(payload) < expected:
        raise _error(path, f"truncated: shape {shape} needs {expected} payload bytes, found {len(payload)}")
    if len(payload) > expected:
        raise _error(path, f"trailing bytes after the {expected}-byte payload of shape {shape}")
    arr = np.frombuffer(payload, dtype=dtype).reshape(shape)
    return arr if dtype.isnative or dtype.itemsize == 1 else arr.astype(dtype.newbyteorder("="))


def _missing(directory: Path) -> list[str]:
    return [name for name in FILES if not (directory / name).is_file()]


def find_dir(data_dir: str | Path | None = None) -> Path:
    """The folder holding the four Fashion-MNIST files.

    Looks in ``data_dir`` when given (and nowhere else), otherwise in
    ``$RETRIEVAL_DATA_DIR/fashion-mnist`` (see ``retrieval_core.data.paths``), then in ``SYSTEM_DIR``.

    Raises:
        FashionMNISTError: no candidate holds all four files; the message lists where it looked.
    """
    candidates = [Path(data_dir)] if data_dir is not None else [dataset_dir("fashion-mnist"), SYSTEM_DIR]
    looked = []
    for directory in candidates:
        missing = _missing(directory)
        if not missing:
            return directory
        looked.append(f"{directory} (missing {', '.join(missing)})")
    raise _error("Fashion-MNIST", "files not found; looked in " + "; ".join(looked))


def load(
    split: str, data_dir: str | Path | None = None, *, expected_count: int | None | str = "real"
) -> tuple[np.ndarray, np.ndarray]:
    """Load one split of Fashion-MNIST.

    Args:
        split: ``"train"`` or ``"test"``.
        data_dir: folder of the four files; ``None`` searches as ``find_dir`` does.
        expected_count: number of images the split must have: ``"real"`` (default) the size of the
            original split (60,000 / 10,000); an int that number; ``None`` any (for tiny test files).

    Returns:
        ``(images, labels)``: images ``(N, 28, 28)`` uint8, labels ``(N,)`` int64 in ``0..9``
        (indices into ``CLASSES``).

    Raises:
        ValueError: unknown split.
        FashionMNISTError: missing files or files that are not the expected Fashion-MNIST data.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    directory = find_dir(data_dir)
    images_path = directory / f"{SPLITS[split]}-images-idx3-ubyte.gz"
    labels_path = directory / f"{SPLITS[split]}-labels-idx1-ubyte.gz"
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (IMAGE_SIDE, IMAGE_SIDE):
        raise _error(images_path, f"expected uint8 images of shape (N, 28, 28), found {images.dtype} {images.shape}")
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise _error(labels_path, f"expected uint8 labels of shape (N,), found {labels.dtype} {labels.shape}")
    if len(images) != len(labels):
        raise _error(labels_path, f"{len(labels)} labels for the {len(images)} images of {images_path.name}")
    count = SPLIT_SIZES[split] if expected_count == "real" else expected_count
    if count is not None and len(images) != count:
        raise _error(images_path, f"{len(images)} images, the {split} split has {count}")
    if len(labels) and int(labels.max()) >= len(CLASSES):
        bad = int(np.argmax(labels >= len(CLASSES)))
        raise _error(labels_path, f"label {int(labels[bad])} at index {bad} is outside 0..{len(CLASSES) - 1}")
    return images, labels.astype(np.int64)
