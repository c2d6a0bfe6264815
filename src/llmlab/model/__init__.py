"""The transformer and its configuration."""

from llmlab.model.config import ConfigError, ModelConfig
from llmlab.model.transformer import KVCache, Transformer

__all__ = ["ConfigError", "KVCache", "ModelConfig", "Transformer"]
