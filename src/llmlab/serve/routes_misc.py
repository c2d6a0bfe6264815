"""The routes around generation: the web chat page, health, metrics, models, the tokenizer endpoints
(what lm-evaluation-harness's "remote" tokenizer calls) and the web chat's feedback."""

from __future__ import annotations

import asyncio
from pathlib import Path

from fastapi import APIRouter, Request as HTTPRequest
from fastapi.responses import HTMLResponse, PlainTextResponse

from llmlab.serve import schemas as S
from llmlab.serve.error_replies import ERRORS, APIError
from llmlab.serve.state import ServerState

STATIC = Path(__file__).parent / "static"
UNAUTHORIZED = {401: {"model": S.ErrorBody}}

router = APIRouter()


def server(http: HTTPRequest) -> ServerState:
    return http.app.state.server


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def web_chat():
    return HTMLResponse((STATIC / "chat.html").read_text())


@router.get("/health", response_model=S.Health)
async def health(http: HTTPRequest):
    state = server(http)
    return {"status": "ok", "model": state.options.model_name, "busy_rows": state.batcher.busy_rows,
            "queue_depth": state.batcher.queue_depth}


@router.get("/metrics", response_class=PlainTextResponse, responses=UNAUTHORIZED)
async def prometheus(http: HTTPRequest):
    state = server(http)
    text = state.metrics.render(state.batcher.queue_depth, state.batcher.busy_rows, state.options.max_batch)
    return PlainTextResponse(text, media_type="text/plain; version=0.0.4")


def model_card(state: ServerState) -> dict:
    return {"id": state.options.model_name, "object": "model", "created": state.created, "owned_by": "llmlab"}


@router.get("/v1/models", response_model=S.ModelList, responses=UNAUTHORIZED)
async def models(http: HTTPRequest):
    return {"object": "list", "data": [model_card(server(http))]}


@router.get("/v1/models/{model_id}", response_model=S.ModelCard, responses=ERRORS)
async def one_model(model_id: str, http: HTTPRequest):
    server(http).check_model(model_id)
    return model_card(server(http))


@router.get("/tokenizer_info", responses=UNAUTHORIZED)
async def tokenizer_info(http: HTTPRequest):
    state = server(http)
    tokenizer = state.tokenizer

    def token(i):
        return tokenizer.decode([i]) if i is not None else None

    return {"eos_token": token(tokenizer.eos_token_id), "bos_token": token(tokenizer.bos_token_id),
            "pad_token": token(tokenizer.pad_token_id), "chat_template": tokenizer.chat_template,
            "model_max_length": state.max_len}


@router.post("/tokenize", responses=ERRORS)
async def tokenize(body: S.TokenizeIn, http: HTTPRequest):
    return {"tokens": server(http).tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)}


@router.post("/detokenize", responses=ERRORS)
async def detokenize(body: S.DetokenizeIn, http: HTTPRequest):
    tokenizer = server(http).tokenizer
    bad = [t for t in body.tokens if not 0 <= t < tokenizer.vocab_size]
    if bad:
        raise APIError(400, f"token id {bad[0]} is out of range", param="tokens")
    return {"prompt": tokenizer.decode(body.tokens)}


@router.post("/v1/feedback", response_model=S.FeedbackOut, responses=ERRORS)
async def feedback(body: S.FeedbackIn, http: HTTPRequest):
    state = server(http)
    if state.store is None:
        raise APIError(400, "feedback is off: start the server with a database (llmlab serve --db FILE)",
                       code="feedback_disabled")
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    row = await asyncio.to_thread(state.store.add, body.conversation_id, body.answer_id, messages, body.answer,
                                  body.rating, body.comment, body.replaces, state.options.model_name)
    return {"id": row, "stored": True}
