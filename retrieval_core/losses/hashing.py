"""Deep-hashing losses: Deep Cauchy Hashing's pairwise and quantisation losses, and the ADSH adversary's losses.

All take relaxed codes ``h`` in [-1, 1]^K (the tanh of the hash head); distances are injected, so a test
can swap in a naive one. The Hamming distance of sign codes is ``K/2 (1 - cos(b_i, b_j))``; the relaxed
distance below is the same formula on the real-valued codes (DCH, Cao et al. 2018).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

Distance = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

_EPS = 1e-6


def relaxed_hamming_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(n, K) x (m, K) -> (n, m) ``K/2 (1 - cos(a_i, b_j))``: the Hamming distance when both are sign codes."""
    k = a.shape[1]
    return 0.5 * k * (1.0 - F.normalize(a, dim=1, eps=_EPS) @ F.normalize(b, dim=1, eps=_EPS).t())


class CauchyHashingLoss(nn.Module):
    """Deep Cauchy Hashing's pairwise loss over every ordered pair (i, j), i != j, of a batch.

    ``s_ij log(1 + d_ij / gamma) + (1 - s_ij) log(1 + gamma / d_ij)``, which is
    ``-s log(gamma / (gamma + d)) - (1 - s) log(1 - gamma / (gamma + d))``: the negative log-likelihood of a
    Cauchy "similar" probability ``gamma / (gamma + d)``. Its gradient is steep for similar pairs only while
    they are far apart, which packs them inside a small Hamming radius.

    Args:
        gamma: Cauchy scale; DCH uses about 20 for 64 bits.
        balance: weight similar and dissimilar pairs by ``n_pairs / n_similar`` and ``n_pairs / n_dissimilar``
            (DCH's ``w_ij``), so ten or more classes do not drown the few similar pairs.
        distance: (codes, codes) -> pairwise distances.
    """

    def __init__(self, gamma: float = 20.0, balance: bool = True, distance: Distance = relaxed_hamming_distance):
        super().__init__()
        if gamma <= 0:
            raise ValueError(f"gamma must be > 0, got {gamma}")
        self.gamma = gamma
        self.balance = balance
        self.distance = distance

    def forward(self, codes: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        n = codes.shape[0]
        d = self.distance(codes, codes).clamp_min(0.0)
        similar = (labels[:, None] == labels[None, :]).to(codes.dtype)
        off_diagonal = 1.0 - torch.eye(n, dtype=codes.dtype, device=codes.device)
        # log(1 + gamma/d) = log(d + gamma) - log(d); the eps keeps identical dissimilar codes finite.
        pull = torch.log1p(d / self.gamma)
        push = torch.log(d + self.gamma) - torch.log(d + _EPS)
        weight_s, weight_d = similar * off_diagonal, (1.0 - similar) * off_diagonal
        if self.balance:
            pairs = off_diagonal.sum()
            n_s, n_d = weight_s.sum(), weight_d.sum()
            weight_s = weight_s * (pairs / n_s.clamp_min(1.0))
            weight_d = weight_d * (pairs / n_d.clamp_min(1.0))
        total = (weight_s * pull + weight_d * push).sum()
        return total / off_diagonal.sum().clamp_min(1.0)


class CauchyQuantizationLoss(nn.Module):
    """DCH's quantisation loss: ``mean_i log(1 + d(|h_i|, 1) / gamma)``.

    With the cosine distance it pulls ``|h_i|`` towards a multiple of the all-ones vector (every coordinate
    the same magnitude), not towards +-1 itself; every loss here is scale-free, and the tanh saturates.

    Args:
        gamma: Cauchy scale, the same as the pairwise loss's.
        distance: (codes, codes) -> pairwise distances; applied row by row to ``|h_i|`` and the all-ones code.
    """

    def __init__(self, gamma: float = 20.0, distance: Distance = relaxed_hamming_distance):
        super().__init__()
        if gamma <= 0:
            raise ValueError(f"gamma must be > 0, got {gamma}")
        self.gamma = gamma
        self.distance = distance

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        ones = torch.ones(1, codes.shape[1], dtype=codes.dtype, device=codes.device)
        d = self.distance(codes.abs(), ones)[:, 0].clamp_min(0.0)
        return torch.log1p(d / self.gamma).mean()


def same_class_partners(labels: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, ...]:
    """For every item with another item of its class in the batch, one such partner drawn at random.

    Returns:
        (anchors, partners): index tensors of equal length; ``labels[anchors] == labels[partners]`` and
        ``anchors != partners``. Items alone in their class are left out.
    """
    n = labels.shape[0]
    same = (labels[:, None] == labels[None, :]) & ~torch.eye(n, dtype=torch.bool, device=labels.device)
    has_partner = same.any(dim=1)
    anchors = torch.nonzero(has_partner).flatten()
    if anchors.numel() == 0:
        return anchors, anchors
    # A uniform draw among each row's candidates: random keys, non-candidates pushed below every candidate.
    keys = torch.rand(n, n, generator=generator).to(labels.device)
    keys = keys.masked_fill(~same, -1.0)
    partners = keys[anchors].argmax(dim=1)
    return anchors, partners


def straight_through_sign(codes: torch.Tensor) -> torch.Tensor:
    """``sign(codes)`` forward, the identity backward: what a binary code looks like, with a usable gradient."""
    return codes + (torch.sign(codes) - codes).detach()


def _binarised(codes: torch.Tensor, binary: bool) -> torch.Tensor:
    return straight_through_sign(codes) if binary else codes


class PairAdversarialLoss(nn.Module):
    """ADSH's adversary: a discriminator tells an image's own code from the code of a same-class image.

    The discriminator ``D(feature, code) -> logit`` sees real pairs ``(f_i, h_i)`` (label 1) and mismatched
    pairs ``(f_i, h_j)`` with ``j`` of the same class (label 0). The hashing network is trained to fool it
    (the labels swapped), which it can only do by giving semantically similar images interchangeable
    codes: codes carry the class, not the image's nuisance detail, and similar items fall inside a small
    Hamming radius.

    ``discriminator_loss`` detaches its inputs (it trains the discriminator only); ``generator_loss`` lets
    gradients reach whatever it is given (the training job passes detached features, so the adversary
    shapes the codes and cannot win by blurring the features). Both need at least one anchor: the caller
    skips the adversarial step for a batch without a same-class pair.

    Args:
        binary: show the discriminator ``sign(h)`` (straight-through gradient) instead of the relaxed code,
            so it judges the codes that are indexed, not sub-threshold differences the sign throws away.
    """

    def __init__(self, binary: bool = False) -> None:
        super().__init__()
        self.binary = binary

    def _logits(self, discriminator: nn.Module, features, codes, anchors, partners) -> tuple[torch.Tensor, ...]:
        codes = _binarised(codes, self.binary)
        real = discriminator(features[anchors], codes[anchors])
        swapped = discriminator(features[anchors], codes[partners])
        return real.flatten(), swapped.flatten()

    def discriminator_loss(
        self, discriminator: nn.Module, features: torch.Tensor, codes: torch.Tensor, anchors, partners
    ) -> torch.Tensor:
        if anchors.numel() == 0:
            raise ValueError("no same-class pair in the batch: nothing for the discriminator to compare")
        real, swapped = self._logits(discriminator, features.detach(), codes.detach(), anchors, partners)
        return 0.5 * (
            F.binary_cross_entropy_with_logits(real, torch.ones_like(real))
            + F.binary_cross_entropy_with_logits(swapped, torch.zeros_like(swapped))
        )

    def generator_loss(
        self, discriminator: nn.Module, features: torch.Tensor, codes: torch.Tensor, anchors, partners
    ) -> torch.Tensor:
        if anchors.numel() == 0:
            raise ValueError("no same-class pair in the batch: nothing for the discriminator to compare")
        real, swapped = self._logits(discriminator, features, codes, anchors, partners)
        return 0.5 * (
            F.binary_cross_entropy_with_logits(real, torch.zeros_like(real))
            + F.binary_cross_entropy_with_logits(swapped, torch.ones_like(swapped))
        )


class PriorAdversarialLoss(nn.Module):
    """The alternative adversary of METHODS.md: a discriminator tells codes from draws of a uniform +-1 prior.

    Fooling it makes every bit balanced, independent of the others and saturated at +-1, which is what a
    Hamming index wants from its codes; it says nothing about classes (the pairwise loss does that). The
    discriminator is conditioned on nothing: it is called with ``features[:, :0]``, so a
    ``CodePairDiscriminator`` with ``feature_dim=0`` serves.

    Args:
        binary: as for ``PairAdversarialLoss`` (the prior draws are binary already).
    """

    def __init__(self, binary: bool = False) -> None:
        super().__init__()
        self.binary = binary

    @staticmethod
    def sample_prior(like: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Uniform +-1 codes of ``like``'s shape, dtype and device."""
        bits = torch.randint(0, 2, like.shape, generator=generator).to(like.device, like.dtype)
        return bits * 2.0 - 1.0

    def _logits(self, discriminator: nn.Module, codes: torch.Tensor, prior: torch.Tensor) -> tuple[torch.Tensor, ...]:
        nothing = codes[:, :0]
        return discriminator(nothing, prior).flatten(), discriminator(nothing, _binarised(codes, self.binary)).flatten()

    def discriminator_loss(self, discriminator: nn.Module, codes: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
        real, fake = self._logits(discriminator, codes.detach(), prior)
        return 0.5 * (
            F.binary_cross_entropy_with_logits(real, torch.ones_like(real))
            + F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake))
        )

    def generator_loss(self, discriminator: nn.Module, codes: torch.Tensor) -> torch.Tensor:
        fake = discriminator(codes[:, :0], _binarised(codes, self.binary)).flatten()
        return F.binary_cross_entropy_with_logits(fake, torch.ones_like(fake))
