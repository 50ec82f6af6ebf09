"""Model architectures, registered by name (see ``registry``)."""

from retrieval_core.models import baseline  # noqa: F401  (registers its models)
from retrieval_core.models.registry import create_model, list_models, register_model

__all__ = ["create_model", "list_models", "register_model"]
