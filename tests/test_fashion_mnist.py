"""Fashion-MNIST IDX reader: tiny hand-built files (good and broken) and, where installed, the real files."""

from __future__ import annotations

import gzip
import hashlib
import struct
from pathlib import Path

import numpy as np
import pytest

from retrieval_core.data import fashion_mnist as fm

_TYPE_CODES = {np.dtype(np.uint8): 0x08, np.dtype(">i4"): 0x0C, np.dtype(">f4"): 0x0D}


def idx_bytes(arr: np.ndarray, type_code: int | None = None, magic_prefix: bytes = b"\x00\x00") -> bytes:
    """An IDX file: 2 magic bytes, type code, ndim, big-endian uint32 sizes, big-endian payload."""
    big = arr.astype(arr.dtype.newbyteorder(">")) if arr.dtype.itemsize > 1 else arr
    code = _TYPE_CODES[big.dtype] if type_code is None else type_code
    header = magic_prefix + bytes([code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + big.tobytes()


def write(path: Path, data: bytes, compress: bool = True) -> Path:
    path.write_bytes(gzip.compress(data) if compress else data)
    return path


def fake_dataset(directory: Path, n_train: int = 6, n_test: int = 4, side: tuple[int, int] = (28, 28)) -> Path:
    """The four files, tiny, under their original names."""
    rng = np.random.default_rng(0)
    directory.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, *side), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        write(directory / f"{prefix}-images-idx3-ubyte.gz", idx_bytes(images))
        write(directory / f"{prefix}-labels-idx1-ubyte.gz", idx_bytes(labels))
    return directory


@pytest.mark.parametrize("compress", [True, False], ids=["gzip", "raw"])
@pytest.mark.parametrize(
    "arr",
    [
        np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4),
        np.array([-5, 0, 70000, 2**31 - 1], dtype=np.int32),
        np.array([[0.5, -1.25], [3.0, 1e-3]], dtype=np.float32),
    ],
    ids=["uint8-3d", "int32", "float32"],
)
def test_good_files_round_trip(tmp_path, arr, compress):
    out = fm.read_idx(write(tmp_path / "a.idx", idx_bytes(arr), compress))
    assert out.shape == arr.shape and out.dtype.isnative and out.dtype.kind == arr.dtype.kind
    np.testing.assert_array_equal(out, arr)


def _cases() -> dict[str, tuple[bytes, bool, str]]:
    """name -> (file bytes, gzip them?, part of the expected message)."""
    good = idx_bytes(np.zeros((3, 4), np.uint8))
    return {
        "bad magic": (idx_bytes(np.zeros(3, np.uint8), magic_prefix=b"\x01\x02"), True, "not an IDX file"),
        "unknown type code": (idx_bytes(np.zeros(3, np.uint8), type_code=0x0A), True, "unknown IDX type code 0x0A"),
        "truncated payload": (good[:-1], True, "truncated"),
        "trailing bytes": (good + b"\x00", True, "trailing bytes"),
        "truncated header": (good[:6], False, "truncated header"),
        "truncated gzip stream": (gzip.compress(good)[:-12], False, "damaged gzip stream"),
        "not gzip garbage": (b"\x1f\x8b" + b"garbage" * 10, False, "damaged gzip stream"),
    }


@pytest.mark.parametrize("name", list(_cases()))
def test_broken_files_raise_a_helpful_error(tmp_path, name):
    data, compress, expected = _cases()[name]
    path = write(tmp_path / "broken.gz", data, compress)
    with pytest.raises(fm.FashionMNISTError) as info:
        fm.read_idx(path)
    message = str(info.value)
    assert expected in message and str(path) in message
    assert message.endswith(fm.HOW_TO_GET)


def test_a_header_that_lies_about_the_size_does_not_allocate_it(tmp_path):
    # 2**32-1 x 2**32-1 uint8 declared, 3 bytes there: reading must stop at what exists.
    data = b"\x00\x00\x08\x02" + struct.pack(">2I", 2**32 - 1, 2**32 - 1) + b"abc"
    with pytest.raises(fm.FashionMNISTError, match="truncated"):
        fm.read_idx(write(tmp_path / "huge.gz", data))


def test_load_returns_uint8_images_and_int64_labels(tmp_path):
    directory = fake_dataset(tmp_path / "fmnist")
    images, labels = fm.load("train", directory, expected_count=None)
    assert images.shape == (6, 28, 28) and images.dtype == np.uint8
    assert labels.dtype == np.int64 and labels.tolist() == [0, 1, 2, 3, 4, 5]
    assert fm.load("test", directory, expected_count=4)[0].shape == (4, 28, 28)
    with pytest.raises(ValueError, match="split"):
        fm.load("validation", directory)


def test_load_checks_the_real_split_size_by_default(tmp_path):
    directory = fake_dataset(tmp_path / "fmnist")
    with pytest.raises(fm.FashionMNISTError, match="6 images, the train split has 60000"):
        fm.load("train", directory)


def test_label_out_of_range(tmp_path):
    directory = fake_dataset(tmp_path / "fmnist")
    write(directory / "train-labels-idx1-ubyte.gz", idx_bytes(np.array([0, 1, 12, 3, 4, 5], np.uint8)))
    with pytest.raises(fm.FashionMNISTError, match=r"label 12 at index 2 is outside 0\.\.9") as info:
        fm.load("train", directory, expected_count=None)
    assert "train-labels-idx1-ubyte.gz" in str(info.value)


def test_image_and_label_counts_must_agree(tmp_path):
    directory = fake_dataset(tmp_path / "fmnist")
    write(directory / "t10k-labels-idx1-ubyte.gz", idx_bytes(np.zeros(3, np.uint8)))
    with pytest.raises(fm.FashionMNISTError, match="3 labels for the 4 images"):
        fm.load("test", directory, expected_count=None)


def test_wrong_image_shape(tmp_path):
    directory = fake_dataset(tmp_path / "fmnist", side=(27, 28))
    with pytest.raises(fm.FashionMNISTError, match=r"\(N, 28, 28\).*\(6, 27, 28\)") as info:
        fm.load("train", directory, expected_count=None)
    assert "train-images-idx3-ubyte.gz" in str(info.value)


def test_missing_files_say_how_to_get_them(tmp_path, monkeypatch):
    monkeypatch.setenv("RETRIEVAL_DATA_DIR", str(tmp_path / "nowhere"))
    monkeypatch.setattr(fm, "SYSTEM_DIR", tmp_path / "no-system-dir")
    with pytest.raises(fm.FashionMNISTError) as info:
        fm.load("train")
    message = str(info.value)
    assert "apt-get install dataset-fashion-mnist" in message
    assert str(tmp_path / "nowhere" / "fashion-mnist") in message and str(tmp_path / "no-system-dir") in message
    with pytest.raises(fm.FashionMNISTError, match="apt-get install dataset-fashion-mnist"):
        fm.find_dir(tmp_path / "empty")


def test_find_dir_prefers_the_data_dir_over_the_system_dir(tmp_path, monkeypatch):
    system = fake_dataset(tmp_path / "system")
    monkeypatch.setattr(fm, "SYSTEM_DIR", system)
    monkeypatch.setenv("RETRIEVAL_DATA_DIR", str(tmp_path / "data"))
    assert fm.find_dir() == system  # nothing under $RETRIEVAL_DATA_DIR yet
    user = fake_dataset(tmp_path / "data" / "fashion-mnist")
    assert fm.find_dir() == user
    (user / "t10k-labels-idx1-ubyte.gz").unlink()  # incomplete: not used
    assert fm.find_dir() == system


def _real_dir() -> Path:
    try:
        return fm.find_dir()
    except fm.FashionMNISTError as e:
        pytest.skip(f"real Fashion-MNIST not installed (`make data`): {e}")


def test_real_files():
    directory = _real_dir()
    for split, n in (("train", 60_000), ("test", 10_000)):
        images, labels = fm.load(split)
        assert images.shape == (n, 28, 28) and images.dtype == np.uint8
        assert labels.shape == (n,) and labels.dtype == np.int64
        assert np.bincount(labels, minlength=10).tolist() == [n // 10] * 10
        assert images.max() == 255 and images.min() == 0
    with gzip.open(directory / "t10k-labels-idx1-ubyte.gz") as f:
        assert hashlib.md5(f.read()).hexdigest() == "15d484375f8d13e6eb1aabb0c3f46965"  # from SOURCE.md
