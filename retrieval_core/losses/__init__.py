"""Loss modules, one family per file, created by name through ``create_loss``."""

from retrieval_core.losses.gsn import GridScoreLoss, GridSoftmaxLoss, GridTripletLoss
from retrieval_core.losses.hashing import (
    CauchyHashingLoss,
    CauchyQuantizationLoss,
    PairAdversarialLoss,
    PriorAdversarialLoss,
)
from retrieval_core.losses.metric import QuantizationLoss, SupConLoss

_LOSSES = {
    "supcon": SupConLoss,
    "quantization": QuantizationLoss,
    "cauchy": CauchyHashingLoss,
    "cauchy_quantization": CauchyQuantizationLoss,
    "pair_adversarial": PairAdversarialLoss,
    "prior_adversarial": PriorAdversarialLoss,
    "gsn_score": GridScoreLoss,
    "gsn_softmax": GridSoftmaxLoss,
    "gsn_triplet": GridTripletLoss,
}


def create_loss(name: str, **config):
    """Build a loss by the name a training config stores."""
    try:
        return _LOSSES[name](**config)
    except KeyError:
        raise KeyError(f"unknown loss {name!r}; known: {sorted(_LOSSES)}") from None


__all__ = [
    "CauchyHashingLoss",
    "CauchyQuantizationLoss",
    "GridScoreLoss",
    "GridSoftmaxLoss",
    "GridTripletLoss",
    "PairAdversarialLoss",
    "PriorAdversarialLoss",
    "QuantizationLoss",
    "SupConLoss",
    "create_loss",
]
