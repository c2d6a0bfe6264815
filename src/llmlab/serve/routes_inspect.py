"""The web chat's attention view: the attention weights of one layer (every head) over a rendered exchange, as JSON.

The page sends the last exchange (the user's message and the model's answer); the server renders it with the chat
template and recomputes the weights with llmlab.inspect.attention_maps, outside the batcher's thread (its hooks
record only the calling thread, so answers being generated meanwhile are neither disturbed nor recorded).
"""

from __future__ import annotations

import asyncio
from typing import Literal

from fastapi import APIRouter
from fastapi import Request as HTTPRequest
from pydantic import BaseModel, ConfigDict, Field

from llmlab.errors import LLMLabError
from llmlab.inspect.attention import attention_maps
from llmlab.inspect.plots import token_labels
from llmlab.serve.error_replies import ERRORS, APIError

router = APIRouter()
MAX_TOKENS = 256  # a layer's maps are heads x T x T numbers: 9 x 256 x 256 is already ~4 MB of JSON


class ViewMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=200_000)


class AttentionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    messages: list[ViewMessage] = Field(min_length=1, max_length=64)
    layer: int = 0


def exchange_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of the messages as the chat template renders them (no generation prompt: the answer is there)."""
    if not tokenizer.chat_template:
        return tokenizer.encode("".join(m["content"] for m in messages), add_special_tokens=True)
    return tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=False))


def layer_view(llm, messages: list[dict], layer: int) -> dict:
    model = llm.model
    n_layers, n_heads = len(model.model.layers), model.config.n_heads
    if not 0 <= layer < n_layers:
        raise APIError(400, f"attention layer {layer} does not exist: the model has layers 0..{n_layers - 1}",
                       param="layer")
    try:
        ids = exchange_ids(llm.tokenizer, messages)
    except LLMLabError as e:
        raise APIError(400, str(e), param="messages") from None
    if not ids or len(ids) > MAX_TOKENS:
        raise APIError(400, f"the exchange is {len(ids)} tokens; the attention view shows 1 to {MAX_TOKENS}",
                       param="messages")
    maps = attention_maps(model, ids, [layer])
    weights = maps.weights[0].float().numpy().round(4)
    return {"tokens": token_labels(llm.tokenizer, ids), "layer": layer, "n_layers": n_layers, "n_heads": n_heads,
            "weights": weights.tolist(), "max_error": maps.max_error}


@router.post("/v1/inspect/attention", responses=ERRORS, include_in_schema=False)
async def attention(body: AttentionRequest, http: HTTPRequest):
    """{"tokens": [...], "layer", "n_layers", "n_heads", "weights": heads x T x T (row = query, causal)}."""
    llm = http.app.state.server.llm
    messages = [m.model_dump() for m in body.messages]
    return await asyncio.to_thread(layer_view, llm, messages, body.layer)
