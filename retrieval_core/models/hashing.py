"""The ADSH discriminator: scores whether a code belongs to an image feature.

The hashing network itself is the baseline CNN (``baseline_cnn``, no attribute heads): a category head and a
K-bit hash head (tanh in training, sign at inference) on one trunk, so a hashing bundle is indexed by the
pipeline like any other. The discriminator is used only in training and is not part of the bundle.
"""

from __future__ import annotations

import torch
from torch import nn


class CodePairDiscriminator(nn.Module):
    """MLP on ``[feature, code]`` -> one logit ("this code is this image's own").

    Args:
        feature_dim: size of the image feature (the network's embedding); 0 for an unconditioned critic
            of the codes alone (the prior adversary), called with an ``(n, 0)`` feature tensor.
        bits: code length K.
        hidden: width of the two hidden layers.
    """

    def __init__(self, feature_dim: int, bits: int, hidden: int = 256) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(feature_dim + bits, hidden),
            nn.LeakyReLU(0.2),
            nn.Linear(hidden, hidden),
            nn.LeakyReLU(0.2),
            nn.Linear(hidden, 1),
        )

    def forward(self, features: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([features, codes], dim=1)).squeeze(1)
