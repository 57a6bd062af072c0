"""tokray models: ``nn.Module``s built from arguments only (no device, data path or distributed)."""

from models.registry import create_model, list_models, register_model
from models import pixel_vit, token_vit  # noqa: F401,E402  (registers the token and pixel ViTs with timm too)

__all__ = ["create_model", "list_models", "register_model"]
