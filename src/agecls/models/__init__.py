"""Model registry; importing this package registers every builder."""

from agecls.models import basic_cnn  # noqa: F401  (registers)
from agecls.models.registry import available_models, create_model, register_model

__all__ = ["available_models", "create_model", "register_model"]
