"""The one exception type for bad input: the CLI prints its message as a single line and exits non-zero."""


class LLMLabError(Exception):
    """A problem with what the user gave us (a path, a file, a parameter), not a bug in llmlab."""
