"""Listing and decoding the two real photo datasets kept under ``retrieval_core.data.paths.data_root()``.

``clothing-small``: consumer photos in ``{train,validation}/<class>/<uuid>.jpg``.
``fashion-product-small``: shop photos ``images/<id>.jpg`` with ``styles.csv``
attributes; rows without an image or without the chosen label are left out.
Listings are deterministic (sorted), and a split's classes are one vocabulary
shared by both sides, so label ``i`` means the same class everywhere.

``decode_files`` runs every file through the pipeline's own decoder
(``retrieval_core.preprocess.load_image_file``), so models see exactly the
pixels the indexing pipeline would give them; a file that fails to decode
costs only itself. ``decode_photos_long_side`` decodes with the same decoder
to a fixed long side without letterboxing (photos of their own aspect ratio:
what the distortion recipe works on). Nothing is ever written into the
dataset folders.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from retrieval_core.data.paths import dataset_dir
from retrieval_core.preprocess import DecodeError, Preprocessing, load_image_file, resize_long_side

log = logging.getLogger(__name__)

CLOTHING_SPLITS: tuple[str, ...] = ("train", "validation")
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
_MISSING_LABELS = ("", "NA")


@dataclass(frozen=True, eq=False)  # a generated __eq__ / __hash__ would fail on the labels array
class LabelledFiles:
    """Image files with integer class labels.

    Attributes:
        paths: image file paths.
        labels: ``(N,)`` int64 indices into ``classes``.
        classes: the class names (one vocabulary shared by the splits it came with).
        ids: the dataset's own id of each file (the uuid or product id).
    """

    paths: tuple[str, ...]
    labels: np.ndarray
    classes: tuple[str, ...]
    ids: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.paths)


def _require_dir(directory: Path, dataset: str) -> None:
    if not directory.is_dir():
        raise FileNotFoundError(
            f"{dataset}: folder {directory} not found; set RETRIEVAL_DATA_DIR to the folder that holds {dataset}/"
        )


def _subdirs(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.is_dir() and not p.name.startswith("."))


def clothing_small(split: str, data_dir: str | Path | None = None) -> LabelledFiles:
    """List one split of the clothing-small consumer photos.

    Args:
        split: ``"train"`` or ``"validation"``.
        data_dir: the ``clothing-small`` folder; ``None``: ``dataset_dir("clothing-small")``.

    Returns:
        The files sorted by (class, file name); classes are the sorted class folders of ``train/``,
        so both splits share one vocabulary.

    Raises:
        ValueError: unknown split, or a validation class that train does not have.
        FileNotFoundError: the dataset folder or the split folder is missing.
    """
    if split not in CLOTHING_SPLITS:
        raise ValueError(f"split must be one of {list(CLOTHING_SPLITS)}, got {split!r}")
    root = Path(data_dir) if data_dir is not None else dataset_dir("clothing-small")
    _require_dir(root / "train", "clothing-small")
    _require_dir(root / split, "clothing-small")
    classes = tuple(_subdirs(root / "train"))
    unknown = sorted(set(_subdirs(root / split)) - set(classes))
    if unknown:
        raise ValueError(f"clothing-small: {root / split} has classes that train/ does not: {unknown}")
    paths, labels, ids = [], [], []
    for label, name in enumerate(classes):
        class_dir = root / split / name
        if not class_dir.is_dir():
            continue  # a class with no photos in this split
        for file in sorted(class_dir.iterdir()):
            if file.is_file() and file.suffix.lower() in _IMAGE_SUFFIXES:
                paths.append(str(file))
                labels.append(label)
                ids.append(file.stem)
    return LabelledFiles(tuple(paths), np.asarray(labels, dtype=np.int64), classes, tuple(ids))


def _read_styles(csv_path: Path, label: str) -> tuple[list[tuple[int, str]], int]:
    """(id, label value) of the well-formed rows of styles.csv, and the number of malformed rows skipped."""
    rows: dict[int, str] = {}
    malformed = 0
    with open(csv_path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = [h.strip() for h in next(reader, [])]
        if "id" not in header or label not in header:
            raise ValueError(f"{csv_path}: header {header} lacks 'id' or {label!r}")
        id_col, label_col = header.index("id"), header.index(label)
        for row in reader:
            if not row:
                continue  # blank line
            # A wrong field count (e.g. an unquoted comma in a value) shifts the columns: no value can be trusted.
            raw_id = row[id_col].strip() if len(row) == len(header) else ""
            if not raw_id.isdigit() or int(raw_id) in rows:
                malformed += 1
                continue
            rows[int(raw_id)] = row[label_col].strip()
    return sorted(rows.items()), malformed


def fashion_product_split(
    seed: int = 0, query_fraction: float = 0.1, label: str = "articleType", data_dir: str | Path | None = None
) -> tuple[LabelledFiles, LabelledFiles]:
    """Split the fashion-product-small shop photos into queries and a database, labelled by one attribute.

    Kept: rows of ``styles.csv`` whose image exists and whose ``label`` value is neither empty nor ``"NA"``.
    Malformed rows (wrong field count, non-numeric or repeated id) are skipped with one warning.

    Args:
        seed: seed of the ``numpy.random.default_rng`` that draws the queries.
        query_fraction: share of the kept products that become queries, in (0, 1).
        label: the ``styles.csv`` column used as class (``articleType``, ``baseColour``, ``gender``, ...).
        data_dir: the ``fashion-product-small`` folder; ``None``: ``dataset_dir("fashion-product-small")``.

    Returns:
        ``(queries, database)``, disjoint, each in numeric id order, sharing the sorted vocabulary of
        the label values over all kept rows.

    Raises:
        ValueError: ``query_fraction`` out of range, or ``label`` not a column of styles.csv.
        FileNotFoundError: the dataset folder, ``styles.csv`` or ``images/`` is missing.
    """
    if not 0.0 < query_fraction < 1.0:
        raise ValueError(f"query_fraction must be in (0, 1), got {query_fraction}")
    root = Path(data_dir) if data_dir is not None else dataset_dir("fashion-product-small")
    _require_dir(root / "images", "fashion-product-small")
    csv_path = root / "styles.csv"
    if not csv_path.is_file():
        raise FileNotFoundError(
            f"fashion-product-small: {csv_path} not found; set RETRIEVAL_DATA_DIR to the folder that holds "
            "fashion-product-small/"
        )
    rows, malformed = _read_styles(csv_path, label)
    if malformed:
        log.warning("%s: skipped %d malformed rows", csv_path, malformed)
    images = set(os.listdir(root / "images"))  # one listing instead of ~40k stat calls
    kept = [(i, v) for i, v in rows if v not in _MISSING_LABELS and f"{i}.jpg" in images]
    classes = tuple(sorted({v for _, v in kept}))
    index = {c: k for k, c in enumerate(classes)}
    ids = np.asarray([i for i, _ in kept], dtype=np.int64)
    labels = np.asarray([index[v] for _, v in kept], dtype=np.int64)

    n_queries = round(query_fraction * len(kept))
    is_query = np.zeros(len(kept), dtype=bool)
    is_query[np.random.default_rng(seed).choice(len(kept), size=n_queries, replace=False)] = True

    def part(mask: np.ndarray) -> LabelledFiles:
        chosen = ids[mask]
        return LabelledFiles(
            paths=tuple(str(root / "images" / f"{i}.jpg") for i in chosen),
            labels=labels[mask],
            classes=classes,
            ids=tuple(str(i) for i in chosen),
        )

    return part(is_query), part(~is_query)


def _cache_key(paths: Sequence[str], prep: Preprocessing) -> str:
    """Changes when the preprocessing or any file (path, size, mtime) changes."""
    return _files_key(paths, {"prep": prep.to_dict()})


def _files_key(paths: Sequence[str], settings: dict) -> str:
    """Changes when ``settings`` or any file (path, size, mtime) changes."""
    files = []
    for p in paths:
        st = os.stat(p)
        files.append((str(p), st.st_size, st.st_mtime_ns))
    blob = json.dumps({**settings, "files": files}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def decode_files(
    paths: Sequence[str], prep: Preprocessing, cache_dir: str | None = None, desc: str = "decode"
) -> tuple[np.ndarray, np.ndarray]:
    """Decode image files with the pipeline's decoder, optionally through an on-disk cache.

    Args:
        paths: image files.
        prep: target size and resize policy.
        cache_dir: folder of ``<key>.npz`` caches, keyed by ``prep`` and every file's path, size and
            mtime; ``None``: no cache.
        desc: label of the progress bar.

    Returns:
        ``(pixels, ok)``: pixels ``(M, S, S, 3)`` uint8 of the ``M`` files that decoded, in order;
        ok ``(N,)`` bool, True where the file decoded.

    Raises:
        OSError: a file cannot be read (e.g. it was deleted since it was listed); only
            undecodable content is tolerated.
    """
    paths = [str(p) for p in paths]
    cache_path = None
    if cache_dir is not None:
        cache_path = os.path.join(cache_dir, f"{_cache_key(paths, prep)}.npz")
        cached = _load_cache(cache_path, len(paths), prep.image_size)
        if cached is not None:
            return cached

    pixels = np.empty((len(paths), prep.image_size, prep.image_size, 3), dtype=np.uint8)
    ok = np.zeros(len(paths), dtype=bool)
    failures: dict[str, int] = {}
    for k, p in enumerate(tqdm(paths, desc=desc, unit="img", leave=False)):
        try:
            pixels[k] = load_image_file(p, prep).pixels
            ok[k] = True
        except DecodeError as e:
            failures[e.error_type] = failures.get(e.error_type, 0) + 1
    if failures:
        log.warning("%s: %d of %d files did not decode %s", desc, sum(failures.values()), len(paths), failures)
    if not ok.all():
        pixels = pixels[ok]
    if cache_path is not None:
        _save_cache(cache_path, pixels, ok)
    return pixels, ok


def _save_cache(path: str, pixels: np.ndarray, ok: np.ndarray) -> None:
    """Write the cache atomically (temp file + ``os.replace``): readers never see a half-written one."""
    from retrieval_core.io import atomic_local_file

    with atomic_local_file(path, suffix=".npz") as f:  # straight to disk: a BytesIO would double the memory
        np.savez(f, pixels=pixels, ok=ok)


def _load_cache(path: str, n: int, size: int) -> tuple[np.ndarray, np.ndarray] | None:
    """The cached ``(pixels, ok)``, or None when absent or unusable (then it is rebuilt)."""
    if not os.path.exists(path):
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            pixels, ok = z["pixels"], z["ok"]
    except Exception as e:  # a damaged cache must only cost a re-decode
        log.warning("%s: unreadable cache (%s: %s); decoding again", path, type(e).__name__, e)
        return None
    if ok.shape != (n,) or ok.dtype != bool or pixels.shape != (int(ok.sum()), size, size, 3):
        log.warning("%s: cache does not match the request; decoding again", path)
        return None
    return pixels, ok


def decode_photos_long_side(
    paths: Sequence[str], long_side: int, cache_dir: str | None = None, desc: str = "decode"
) -> tuple[list[np.ndarray], np.ndarray]:
    """Decode image files with the pipeline's decoder at their own aspect ratio, longer side ``long_side`` pixels.

    No letterbox and no square crop: each photo keeps its shape, scaled (down or up) so that its longer side
    is ``long_side``. For working on photos at one resolution whatever size a model later wants (the
    distortion recipe), with the model's own preprocessing applied afterwards.

    Args:
        paths: image files.
        long_side: the longer side of every decoded photo.
        cache_dir: folder of ``<key>.npz`` caches, keyed by ``long_side`` and every file's path, size and
            mtime; ``None``: no cache.
        desc: label of the progress bar.

    Returns:
        ``(photos, ok)``: ``(h, w, 3)`` uint8 arrays with ``max(h, w) == long_side``, of the files that decoded,
        in order; ok ``(N,)`` bool, True where the file decoded.

    Raises:
        OSError: a file cannot be read; only undecodable content is tolerated.
    """
    paths = [str(p) for p in paths]
    cache_path = None
    if cache_dir is not None:
        key = _files_key(paths, {"decode": "long_side", "long_side": long_side})
        cache_path = os.path.join(cache_dir, f"{key}.npz")
        cached = _load_photo_cache(cache_path, len(paths), long_side)
        if cached is not None:
            return cached
    photos: list[np.ndarray] = []
    ok = np.zeros(len(paths), dtype=bool)
    failures: dict[str, int] = {}
    for k, p in enumerate(tqdm(paths, desc=desc, unit="img", leave=False)):
        try:
            pixels = load_image_file(p).pixels
        except DecodeError as e:
            failures[e.error_type] = failures.get(e.error_type, 0) + 1
            continue
        photos.append(np.asarray(resize_long_side(Image.fromarray(pixels), long_side), dtype=np.uint8))
        ok[k] = True
    if failures:
        log.warning("%s: %d of %d files did not decode %s", desc, sum(failures.values()), len(paths), failures)
    if cache_path is not None:
        from retrieval_core.io import atomic_local_file

        shapes = np.array([p.shape for p in photos], dtype=np.int64).reshape(-1, 3)
        flat = np.concatenate([p.ravel() for p in photos]) if photos else np.zeros(0, np.uint8)
        with atomic_local_file(cache_path, suffix=".npz") as f:
            np.savez(f, flat=flat, shapes=shapes, ok=ok)
    return photos, ok


def _load_photo_cache(path: str, n: int, long_side: int) -> tuple[list[np.ndarray], np.ndarray] | None:
    """The cached ``(photos, ok)`` of :func:`decode_photos_long_side`, or None when absent or unusable."""
    if not os.path.exists(path):
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            flat, shapes, ok = z["flat"], z["shapes"], z["ok"]
    except Exception as e:  # a damaged cache must only cost a re-decode
        log.warning("%s: unreadable cache (%s: %s); decoding again", path, type(e).__name__, e)
        return None
    sizes = np.prod(shapes, axis=1) if shapes.ndim == 2 else np.zeros(0, np.int64)
    if (
        ok.shape != (n,)
        or ok.dtype != bool
        or shapes.shape != (int(ok.sum()), 3)
        or flat.dtype != np.uint8
        or flat.size != int(sizes.sum())
        or (len(shapes) and (shapes[:, :2].max(axis=1) != long_side).any())
    ):
        log.warning("%s: cache does not match the request; decoding again", path)
        return None
    ends = np.cumsum(sizes)
    return [flat[end - size : end].reshape(shape) for end, size, shape in zip(ends, sizes, shapes)], ok
