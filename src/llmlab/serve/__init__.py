"""The OpenAI-compatible server (`llmlab serve`), its web chat and the feedback it collects."""

from llmlab.serve.app import ServerOptions, create_app

__all__ = ["ServerOptions", "create_app"]
