"""Binary codes from float embeddings by projection: LSH and ITQ, the unsupervised hashing baselines.

Both centre the embeddings on the training set's mean, project to K dimensions and take signs; codes are
packed like the networks' (``encoder.pack_codes``: bit set where the projection is > 0, MSB first).

- ``LSH``: random Gaussian hyperplanes through the mean (Charikar 2002, sign random projections).
- ``ITQ``: PCA to K dimensions, then the rotation that minimises the quantisation error
  ``||sign(VR) - VR||_F`` by alternating minimisation (Gong & Lazebnik 2011, 50 iterations).
"""

from __future__ import annotations

import numpy as np

from retrieval_core.encoder import pack_codes


class _ProjectionHash:
    """Centre, project to ``bits`` dimensions, sign, pack; subclasses learn ``projection`` in ``fit``."""

    def __init__(self, bits: int, seed: int = 0) -> None:
        if bits <= 0 or bits % 8:
            raise ValueError(f"bits must be a positive multiple of 8, got {bits}")
        self.bits = bits
        self.seed = seed
        self.mean: np.ndarray | None = None
        self.projection: np.ndarray | None = None  # (D, bits)

    def _centre(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] < self.bits:
            raise ValueError(f"need (N, D) embeddings with D >= {self.bits} bits, got shape {x.shape}")
        self.mean = x.mean(axis=0)
        return x - self.mean

    def project(self, x: np.ndarray) -> np.ndarray:
        """(N, D) embeddings -> (N, bits) real projections (the codes before the sign)."""
        if self.projection is None:
            raise RuntimeError(f"{type(self).__name__} is not fitted")
        return (np.asarray(x, dtype=np.float64) - self.mean) @ self.projection

    def encode(self, x: np.ndarray) -> np.ndarray:
        """(N, D) embeddings -> (N, bits / 8) packed uint8 codes."""
        return pack_codes(self.project(x))


class LSH(_ProjectionHash):
    """Sign random projections: ``bits`` Gaussian hyperplanes through the training mean (seeded)."""

    def fit(self, x: np.ndarray) -> LSH:
        d = self._centre(x).shape[1]
        self.projection = np.random.default_rng(self.seed).standard_normal((d, self.bits))
        return self


class ITQ(_ProjectionHash):
    """Iterative quantisation: PCA to ``bits`` dimensions, then a learned orthogonal rotation.

    Args:
        bits: code length.
        seed: seed of the random initial rotation.
        iterations: alternating-minimisation rounds (the paper's 50).
    """

    def __init__(self, bits: int, seed: int = 0, iterations: int = 50) -> None:
        super().__init__(bits, seed)
        self.iterations = iterations
        self.rotation: np.ndarray | None = None
        self.quantization_error: list[float] = []  # ||B - VR||_F^2 / N before each update, for inspection

    def fit(self, x: np.ndarray) -> ITQ:
        xc = self._centre(x)
        # Principal directions from the covariance: (D, D) eigh is cheaper than an SVD of (N, D).
        eigvals, eigvecs = np.linalg.eigh(xc.T @ xc)
        pca = eigvecs[:, np.argsort(eigvals)[::-1][: self.bits]]
        v = xc @ pca
        rng = np.random.default_rng(self.seed)
        rotation, _ = np.linalg.qr(rng.standard_normal((self.bits, self.bits)))
        self.quantization_error = []
        for _ in range(self.iterations):
            z = v @ rotation
            b = np.where(z > 0, 1.0, -1.0)  # the sign rule of pack_codes
            self.quantization_error.append(float(((b - z) ** 2).sum() / len(v)))
            # Fix B, solve the orthogonal Procrustes problem max tr(B^T V R): R = W U^T for B^T V = U S W^T.
            u, _, wt = np.linalg.svd(b.T @ v)
            rotation = wt.T @ u.T
        self.rotation = rotation
        self.projection = pca @ rotation
        return self
