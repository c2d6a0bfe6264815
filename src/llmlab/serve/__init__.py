"""The OpenAI-compatible server (`llmlab serve`), its web chat and the feedback it collects."""

from llmlab.serve.app import create_app
from llmlab.serve.state import ServerOptions

__all__ = ["ServerOptions", "create_app"]
