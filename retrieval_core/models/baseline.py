"""The baseline retrieval network: a small CNN with embedding, hash, category and attribute heads.

Small enough to train from scratch on 2 CPU cores in a few minutes, which is
the point: there is no network here to fetch pretrained weights from.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from retrieval_core.models.registry import register_model


def _conv_bn(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


@register_model("baseline_cnn")
class BaselineNet(nn.Module):
    """Conv trunk -> global pooling -> four heads.

    Args:
        embedding_dim: size of the L2-normalised embedding.
        hash_bits: size of the hash head (tanh relaxation; sign at inference).
        num_categories: classes of the category head.
        attribute_classes: attribute name -> number of values, one classification head each.
        widths: channels of the four stages; each stage halves the resolution.
    """

    def __init__(
        self,
        embedding_dim: int = 128,
        hash_bits: int = 64,
        num_categories: int = 8,
        attribute_classes: dict[str, int] | None = None,
        widths: tuple[int, ...] = (24, 48, 96, 192),
    ) -> None:
        super().__init__()
        layers, c_in = [], 3
        for i, width in enumerate(widths):
            layers += [_conv_bn(c_in, width, stride=2 if i else 1), _conv_bn(width, width, stride=1)]
            if i == 0:
                layers.append(nn.MaxPool2d(2))
            c_in = width
        self.trunk = nn.Sequential(*layers)
        self.neck = nn.Sequential(nn.Linear(2 * c_in, 2 * c_in), nn.BatchNorm1d(2 * c_in), nn.ReLU(inplace=True))
        self.embedding = nn.Linear(2 * c_in, embedding_dim)
        self.hash = nn.Linear(2 * c_in, hash_bits)
        self.category = nn.Linear(2 * c_in, num_categories)
        self.attribute_names = tuple(attribute_classes or {})
        self.attributes = nn.ModuleList(nn.Linear(2 * c_in, n) for n in (attribute_classes or {}).values())

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Returns embedding (L2-normalised), hash (tanh, in [-1, 1]), category and attribute logits."""
        f = self.trunk(x)
        # Average and max pooling together: max keeps small product details (logos, buttons).
        pooled = torch.cat([f.mean(dim=(2, 3)), f.amax(dim=(2, 3))], dim=1)
        h = self.neck(pooled)
        out = {
            "embedding": F.normalize(self.embedding(h), dim=1),
            "hash": torch.tanh(self.hash(h)),
            "category": self.category(h),
        }
        for name, head in zip(self.attribute_names, self.attributes):
            out[f"attr.{name}"] = head(h)
        return out
