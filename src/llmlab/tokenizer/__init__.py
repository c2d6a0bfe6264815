"""Tokenizers: loading, encoding, chat templates and saving (tokenizer.py); training a BPE vocabulary (train.py)."""

from llmlab.tokenizer.tokenizer import Tokenizer

__all__ = ["Tokenizer"]
