"""tokray models: ``nn.Module``s built from arguments only (no device, data path or distributed)."""
