"""Turn decoded pixels into features with a bundle's model: the one code path for pipeline, eval and search."""

from __future__ import annotations

import ctypes
import platform
import re
from dataclasses import dataclass, field

import numpy as np
import torch

from retrieval_core.bundle import BundleConfig, load_bundle
from retrieval_core.embedding_transform import EmbeddingTransformError, parse_embedding_transform, serve_embeddings
from retrieval_core.preprocess import to_model_input


def parse_device(device: str) -> int | None:
    """Check a device name's form (``cpu``, ``cuda``, ``cuda:N``) without looking for the device: ``N``, else None.

    Raises:
        ValueError: any other name.
    """
    match = re.fullmatch(r"cpu|cuda(?::(\d+))?", device)
    if match is None:
        raise ValueError(f"unknown device {device!r}: use 'cpu', 'cuda' or 'cuda:N'")
    return None if match.group(1) is None else int(match.group(1))


def resolve_device(device: str) -> str:
    """Validate a device name (``parse_device``) and that it is here; ``cuda`` without a usable GPU is an error,
    never a silent CPU fallback."""
    index = parse_device(device)
    if device == "cpu":
        return device
    if not torch.cuda.is_available():
        raise RuntimeError(
            f"--device {device} was requested but CUDA is not available here "
            f"(torch {torch.__version__}, torch.cuda.is_available() is False); use --device cpu"
        )
    if index is not None and index >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


_DEVICE_ERROR_TEXT = ("CUDA", "CUBLAS", "cuDNN", "CUDNN", "NCCL", "out of memory", "can't allocate memory")


def is_device_failure(exc: BaseException) -> bool:
    """True for failures of the machine rather than of the batch: out of host or GPU memory, and CUDA, cuBLAS or
    cuDNN errors, including an operator missing for the CUDA backend (the exception or its ``__cause__``).

    They say nothing about the batch's images, and they usually repeat for every later batch (after some CUDA
    errors the process's CUDA context is unusable), so the pipeline lets them fail the work instead of
    dead-lettering the batch: otherwise a run of them would publish a generation without most of its items. A
    runner's retry on another worker, or a smaller ``--batch_size``, may get past them.
    """
    for e in (exc, exc.__cause__):
        if isinstance(e, (MemoryError, torch.OutOfMemoryError, torch.AcceleratorError)):
            return True
        if isinstance(e, RuntimeError) and any(text in str(e) for text in _DEVICE_ERROR_TEXT):
            return True
    return False


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc <malloc.h>
_OLD_GLIBC_MAX_MMAP_THRESHOLD = 32 << 20  # glibc before 2.35 refuses a larger mmap threshold
_HEAP_TUNED = False

CPU_HEAP_BYTES = 1 << 30
"""Allocations up to this size come from malloc's heap, and this much freed memory is kept there (see below)."""


def keep_freed_memory_for_reuse(limit_bytes: int = CPU_HEAP_BYTES) -> bool:
    """Make glibc malloc reuse the forward pass's large buffers instead of returning them to the OS.

    By default glibc serves allocations above a (dynamic, at most 32 MiB) threshold with a fresh ``mmap``
    and trims freed memory at the top of the heap back to the OS. A CPU forward pass allocates and frees
    tens of MiB of activations per batch, so every batch page-faults its memory back in: on the 2-core
    bench machine that was about a quarter of inference time at batch 64, and why smaller batches looked
    faster (see ``bench/throughput.py``). Raising both thresholds keeps those pages mapped; the process
    then holds on to its peak heap, which it would touch again on the next batch anyway. (The same as
    ``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_`` in the environment, without needing them set
    before the process starts.)

    Process-wide and idempotent. Returns whether the thresholds are set; False (and nothing changed) where
    the C library is not glibc.
    """
    global _HEAP_TUNED
    if _HEAP_TUNED:
        return True
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mmap_set = libc.mallopt(_M_MMAP_THRESHOLD, limit_bytes) or libc.mallopt(
            _M_MMAP_THRESHOLD, min(limit_bytes, _OLD_GLIBC_MAX_MMAP_THRESHOLD)
        )
        _HEAP_TUNED = bool(mmap_set) and bool(libc.mallopt(_M_TRIM_THRESHOLD, limit_bytes))
    except (OSError, AttributeError):
        return False
    return _HEAP_TUNED


def pack_codes(signs: np.ndarray) -> np.ndarray:
    """(N, K) real-valued codes -> (N, K/8) uint8, bit set where the value is > 0 (MSB first)."""
    return np.packbits(np.asarray(signs) > 0, axis=1)


@dataclass(frozen=True)
class EncodedBatch:
    """Model outputs for a batch, as plain numpy."""

    embeddings: np.ndarray  # (N, D) float32, L2-normalised (after the bundle's embedding transform, if any)
    codes: np.ndarray  # (N, K/8) uint8
    category: list[str]
    category_score: np.ndarray  # (N,) float32 softmax probability of the predicted category
    attributes: list[dict[str, str]]
    # row -> why the bundle's embedding transform cannot serve that image (its embedding row is zero); only
    # filled by ``encode(..., row_errors=True)``
    errors: dict[int, str] = field(default_factory=dict)


class Encoder:
    """A loaded bundle that encodes batches of (H, W, 3) uint8 pixels."""

    def __init__(self, config: BundleConfig, model: torch.nn.Module, device: str = "cpu") -> None:
        self.config = config
        self.model = model
        self.device = device
        # Mixed precision only where it pays and is safe: CUDA.
        self.autocast = device.startswith("cuda")
        # Parsed once here, not per batch (the config has already validated it).
        transform = config.embedding_transform
        self.embedding_transform = parse_embedding_transform(transform) if transform else None

    @classmethod
    def from_bundle(cls, bundle_dir: str, device: str = "cpu") -> Encoder:
        """Load a bundle onto ``device``; on CPU, also ``keep_freed_memory_for_reuse`` for this process."""
        device = resolve_device(device)
        if device == "cpu":
            keep_freed_memory_for_reuse()
        config, model = load_bundle(bundle_dir, device)
        return cls(config, model, device)

    def encode(self, pixels: np.ndarray | list[np.ndarray], row_errors: bool = False) -> EncodedBatch:
        """Encode a batch of images already resized to the bundle's input size.

        The embeddings are ``serve_embeddings(raw, transform)``: the model's embedding L2-normalised, or, with an
        ``embedding_transform`` in the bundle, f on the L2-normalised embedding, normalised again.

        The transform was checked on [-1, 1] when the bundle was read, so it can fail only where an image's
        embedding lies entirely, e.g. ``sub(x, abs(x))`` on an all-positive one: it is not finite there, or maps
        it to the zero vector.

        Args:
            pixels: (N, H, W, 3) uint8 images.
            row_errors: what such an image does. False (queries): the batch raises. True (the pipeline): its
                row's embedding is zero and ``errors[row]`` says why (the pipeline makes it a dead-letter row);
                the other images are served as usual.

        Raises:
            EmbeddingTransformError: with ``row_errors=False``, an image the transform cannot serve; the
                message names the bundle, the expression and the rows.
        """
        x = torch.from_numpy(to_model_input(np.stack(list(pixels)), self.config.preprocessing)).to(self.device)
        with torch.inference_mode(), torch.autocast("cuda", enabled=self.autocast):
            out = self.model(x)
        raw = out["embedding"].float().cpu().numpy()
        errors: dict[int, str] = {}
        try:
            emb = serve_embeddings(raw, self.embedding_transform)
        except EmbeddingTransformError as e:
            if not row_errors:
                raise EmbeddingTransformError(f"bundle {self.config.model_id}: {e}") from e
            emb, errors = self._serve_row_by_row(raw)
        codes = pack_codes(out["hash"].float().cpu().numpy())
        probs = out["category"].float().softmax(dim=1).cpu()
        score, idx = probs.max(dim=1)
        cats = [self.config.categories[i] for i in idx.tolist()]
        attrs: list[dict[str, str]] = [{} for _ in cats]
        for name, vocab in self.config.attributes.items():
            for row, i in zip(attrs, out[f"attr.{name}"].argmax(dim=1).tolist()):
                row[name] = vocab[i]
        return EncodedBatch(emb.astype(np.float32), codes, cats, score.numpy().astype(np.float32), attrs, errors)

    def _serve_row_by_row(self, raw: np.ndarray) -> tuple[np.ndarray, dict[int, str]]:
        """``serve_embeddings`` one row at a time (a batch has failed): the rows that work, and why the rest fail."""
        emb = np.zeros(raw.shape, np.float32)
        errors: dict[int, str] = {}
        for i in range(len(raw)):
            try:
                emb[i] = serve_embeddings(raw[i : i + 1], self.embedding_transform)[0]
            except EmbeddingTransformError as e:
                errors[i] = f"bundle {self.config.model_id}: {e}".replace("rows [0] of 1", "this image's embedding")
        return emb, errors
