"""POST /v1/embeddings: OpenAI's embeddings API served by the server's embedding model (llmlab.rag.embed.Embedder).

`input` is a string, a list of strings, or token ids of the embedding model's own tokenizer (one list, or a list
of lists; no special tokens: [CLS] and [SEP] are added as for text). Vectors are unit length (float32), as
sentence-transformers' all-MiniLM-L6-v2 gives them, returned as JSON floats or, for encoding_format="base64" (what
the `openai` package asks for by default), as the base64 of little-endian float32 bytes. `dimensions` is refused
unless it is the model's own size: this model's vectors cannot be shortened without losing what they mean.
"""

from __future__ import annotations

import asyncio
import base64
import threading
from typing import Literal

import numpy as np
from fastapi import APIRouter, Request as HTTPRequest
from pydantic import Field

from llmlab.serve import schemas as S
from llmlab.serve.error_replies import ERRORS, APIError
from llmlab.serve.state import ServerState

MAX_INPUTS = 2048  # OpenAI's limit on inputs per request
MAX_TEXT = 100_000  # characters per input: far past what the model reads (256 tokens), refused beyond

router = APIRouter()
_one_at_a_time = threading.Lock()  # two encodings at once would only share the same cores


class EmbeddingRequest(S.Request):
    input: str | list[str] | list[int] | list[list[int]]
    model: str = Field(max_length=4096)
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = Field(default=None, max_length=256)  # accepted and ignored, as in chat


def _rows(body: EmbeddingRequest, embedder) -> list[list[int]]:
    """The request's inputs as rows of token ids with the special tokens, each checked."""
    items = body.input if isinstance(body.input, list) else [body.input]
    if not items:
        raise APIError(400, "input must not be empty", param="input", code="invalid_value")
    if len(items) > MAX_INPUTS:
        raise APIError(400, f"input has {len(items)} items; at most {MAX_INPUTS} per request", param="input",
                       code="invalid_value")
    if isinstance(items[0], int):  # one list of token ids
        items = [items]
    if isinstance(items[0], str):
        for i, text in enumerate(items):
            if not text:
                raise APIError(400, f"input[{i}] is an empty string", param="input", code="invalid_value")
            if len(text) > MAX_TEXT:
                raise APIError(400, f"input[{i}] has {len(text)} characters; at most {MAX_TEXT}", param="input",
                               code="invalid_value")
        return embedder.token_ids(items)
    for i, ids in enumerate(items):
        if not ids:
            raise APIError(400, f"input[{i}] is an empty list of tokens", param="input", code="invalid_value")
        bad = [t for t in ids if not 0 <= t < embedder.vocab_size]
        if bad:
            raise APIError(400, f"input[{i}] has token id {bad[0]}, outside the embedding model's vocabulary of "
                           f"{embedder.vocab_size}", param="input", code="invalid_value")
    return embedder.wrap_ids(items)


def _encode(embedder, rows):
    with _one_at_a_time:
        return embedder.encode_ids(rows)


@router.post("/v1/embeddings", responses=ERRORS)
async def embeddings(body: EmbeddingRequest, http: HTTPRequest):
    state: ServerState = http.app.state.server
    embedder = state.embedder
    if embedder is None:
        raise APIError(404, f"this server serves no embedding model, so not '{body.model}' (start it with "
                       "`llmlab serve --embedding-model all-MiniLM-L6-v2`)", param="model", code="model_not_found")
    if body.model != state.options.embedding_model:
        raise APIError(404, f"the embedding model '{body.model}' does not exist; this server's is "
                       f"'{state.options.embedding_model}'", param="model", code="model_not_found")
    if body.dimensions is not None and body.dimensions != embedder.dim:
        raise APIError(400, f"dimensions={body.dimensions} cannot be honoured: {state.options.embedding_model} gives "
                       f"{embedder.dim}-dimensional vectors and cannot shorten them", param="dimensions",
                       code="invalid_value")
    rows = await asyncio.to_thread(_rows, body, embedder)  # tokenizing 2048 long texts is work too
    vectors = await asyncio.to_thread(_encode, embedder, rows)
    prompt_tokens = sum(len(r) for r in rows)
    state.metrics.count_tokens(prompt_tokens, 0)
    data = [{"object": "embedding", "index": i, "embedding": _encoded(v, body.encoding_format)}
            for i, v in enumerate(vectors)]
    return {"object": "list", "data": data, "model": state.options.embedding_model,
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}}


def _encoded(vector: np.ndarray, encoding_format: str):
    if encoding_format == "base64":
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    return vector.tolist()
