"""The transformer and its configuration."""

from llmlab.model.config import ConfigError, ModelConfig

__all__ = ["ConfigError", "KVCache", "ModelConfig", "Transformer"]


def __getattr__(name):
    # the PyTorch half is imported on first use: reading a config (llmlab.engine.native.lite) never loads PyTorch
    if name in ("KVCache", "Transformer"):
        from llmlab.model import transformer
        return getattr(transformer, name)
    raise AttributeError(f"module 'llmlab.model' has no attribute {name!r}")
