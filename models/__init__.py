"""tokray models: ``nn.Module``s built from arguments only (no device, data path or distributed)."""

from models.registry import create_model, list_models, register_model

__all__ = ["create_model", "list_models", "register_model"]
