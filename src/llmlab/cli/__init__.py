"""The `llmlab` command, the top floor: one module per family of sub-commands, each only parsing and printing."""

from llmlab.cli.main import main

__all__ = ["main"]
