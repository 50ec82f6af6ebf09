"""Turn decoded pixels into features with a bundle's model: the one code path for pipeline, eval and search."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from retrieval_core.bundle import BundleConfig, load_bundle
from retrieval_core.preprocess import to_model_input


def resolve_device(device: str) -> str:
    """Validate a device name; ``cuda`` without a usable GPU is an error, never a silent CPU fallback."""
    if device == "cpu":
        return device
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError(
                f"--device {device} was requested but CUDA is not available here "
                f"(torch {torch.__version__}, torch.cuda.is_available() is False); use --device cpu"
            )
        return device
    raise ValueError(f"unknown device {device!r}: use 'cpu' or 'cuda'")


def pack_codes(signs: np.ndarray) -> np.ndarray:
    """(N, K) real-valued codes -> (N, K/8) uint8, bit set where the value is > 0 (MSB first)."""
    return np.packbits(np.asarray(signs) > 0, axis=1)


@dataclass(frozen=True)
class EncodedBatch:
    """Model outputs for a batch, as plain numpy."""

    embeddings: np.ndarray  # (N, D) float32, L2-normalised
    codes: np.ndarray  # (N, K/8) uint8
    category: list[str]
    category_score: np.ndarray  # (N,) float32 softmax probability of the predicted category
    attributes: list[dict[str, str]]


class Encoder:
    """A loaded bundle that encodes batches of (H, W, 3) uint8 pixels."""

    def __init__(self, config: BundleConfig, model: torch.nn.Module, device: str = "cpu") -> None:
        self.config = config
        self.model = model
        self.device = device
        # Mixed precision only where it pays and is safe: CUDA.
        self.autocast = device.startswith("cuda")

    @classmethod
    def from_bundle(cls, bundle_dir: str, device: str = "cpu") -> Encoder:
        device = resolve_device(device)
        config, model = load_bundle(bundle_dir, device)
        return cls(config, model, device)

    def encode(self, pixels: np.ndarray | list[np.ndarray]) -> EncodedBatch:
        """Encode a batch of images already resized to the bundle's input size."""
        x = torch.from_numpy(to_model_input(np.stack(list(pixels)), self.config.preprocessing)).to(self.device)
        with torch.inference_mode(), torch.autocast("cuda", enabled=self.autocast):
            out = self.model(x)
        emb = torch.nn.functional.normalize(out["embedding"].float(), dim=1).cpu().numpy()
        codes = pack_codes(out["hash"].float().cpu().numpy())
        probs = out["category"].float().softmax(dim=1).cpu()
        score, idx = probs.max(dim=1)
        cats = [self.config.categories[i] for i in idx.tolist()]
        attrs: list[dict[str, str]] = [{} for _ in cats]
        for name, vocab in self.config.attributes.items():
            for row, i in zip(attrs, out[f"attr.{name}"].argmax(dim=1).tolist()):
                row[name] = vocab[i]
        return EncodedBatch(emb.astype(np.float32), codes, cats, score.numpy().astype(np.float32), attrs)
