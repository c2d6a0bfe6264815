"""Shared fixtures."""

import pytest


@pytest.fixture(scope="session")
def smollm2_gguf():
    """The real SmolLM2-135M-Instruct Q4_1 GGUF, pulled into the llmlab cache on first use."""
    from llmlab.checkpoint.registry import resolve

    return resolve("smollm2")
