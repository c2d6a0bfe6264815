"""Training data: ingest, clean, filter and deduplicate corpora; built-in corpora; pack tokens into shards."""

from llmlab.data.bios import World, make_bios_world
from llmlab.data.clean import CleanConfig, clean_corpus, clean_text
from llmlab.data.ingest import Document, read_documents
from llmlab.data.pack import load_manifest, load_shards, pack_documents, tokenizer_sha256
from llmlab.data.pystdlib import iter_stdlib_documents

__all__ = [
    "CleanConfig",
    "Document",
    "World",
    "clean_corpus",
    "clean_text",
    "iter_stdlib_documents",
    "load_manifest",
    "load_shards",
    "make_bios_world",
    "pack_documents",
    "read_documents",
    "tokenizer_sha256",
]
