"""A small model registry: bundles store a name, and every consumer builds models by that name."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Class or factory decorator: ``@register_model("baseline_cnn")``."""

    def wrap(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _MODELS:
            raise ValueError(f"model {name!r} is registered twice")
        _MODELS[name] = factory
        return factory

    return wrap


def create_model(name: str, **config) -> nn.Module:
    """Build a registered model from its config (the ``model_config`` of a bundle)."""
    try:
        factory = _MODELS[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; registered: {sorted(_MODELS)}") from None
    return factory(**config)


def list_models() -> list[str]:
    return sorted(_MODELS)
