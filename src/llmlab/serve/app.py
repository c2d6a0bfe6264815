"""The OpenAI-compatible HTTP server: the app factory putting routes and middleware in front of one server state.

Every route validates its input into a clear 4xx (OpenAI's error body), turns the request into token ids and
SamplingParams, submits it to the batcher and relays the batcher's events: as one JSON body, or as server-sent
events when stream=true. All model work happens in the batcher's thread. The routes live in routes_chat.py,
routes_completions.py and routes_misc.py; what they share is in state.py and generation.py.
"""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI

from llmlab.serve import schemas as S
from llmlab.serve.error_replies import install_error_handlers
from llmlab.serve.middleware import BodyLimit, CountRequests, RequireAPIKey
from llmlab.serve.routes_arena import router as arena_router
from llmlab.serve.routes_chat import router as chat_router
from llmlab.serve.routes_completions import router as completions_router
from llmlab.serve.routes_embeddings import router as embeddings_router
from llmlab.serve.routes_inspect import router as inspect_router
from llmlab.serve.routes_misc import router as misc_router
from llmlab.serve.state import ServerOptions, ServerState

__all__ = ["ServerOptions", "create_app"]


def create_app(llm, options: ServerOptions | None = None) -> FastAPI:
    """The FastAPI app serving `llm` (an llmlab.api.LLM). The batcher thread runs while the app is up."""
    state = ServerState(llm, options or ServerOptions())

    @asynccontextmanager
    async def lifespan(app):
        state.open()
        yield
        state.close()

    app = FastAPI(title="llmlab", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible API for an llmlab model, and a web chat at /. " + S.__doc__)
    app.state.server = state
    app.state.batcher, app.state.metrics, app.state.options = state.batcher, state.metrics, state.options
    install_error_handlers(app, S.UNSUPPORTED)
    # the last added runs first: keys are checked before a body is read, and every answer is counted
    app.add_middleware(BodyLimit, max_bytes=state.options.max_body_bytes)
    app.add_middleware(CountRequests, metrics=state.metrics)
    app.add_middleware(RequireAPIKey, api_keys=state.options.api_keys, metrics=state.metrics)
    for router in (misc_router, chat_router, completions_router, embeddings_router, arena_router, inspect_router):
        app.include_router(router)

    def openapi() -> dict:
        if app.openapi_schema is None:
            state_limits(FastAPI.openapi(app), state)
        return app.openapi_schema

    app.openapi = openapi
    return app


def state_limits(schema: dict, state: ServerState):
    """Write this server's own limits into the OpenAPI schema (the models only know the static ones), so a client
    can read what it will enforce: n up to the batch size, max_tokens up to the context length."""
    o = state.options
    schema["info"]["description"] += (
        f"\n\nThis server's limits: request bodies up to {o.max_body_bytes} bytes (413 above), a context of "
        f"{state.max_len} tokens for prompt + answer, n up to {min(S.MAX_N, o.max_batch)}, {o.max_queue} requests "
        f"waiting for a batch row (429 above), {o.request_timeout:g} s per request (408 above).")
    bodies = schema.get("components", {}).get("schemas", {})
    context = f"the prompt and these tokens together must fit this server's context of {state.max_len} tokens"
    limits = {"n": (min(S.MAX_N, state.options.max_batch), "the batch size of this server"),
              "max_tokens": (state.max_len - 1, context), "max_completion_tokens": (state.max_len - 1, context)}
    for name in ("ChatCompletionRequest", "CompletionRequest"):
        properties = bodies.get(name, {}).get("properties", {})
        for field, (value, why) in limits.items():
            if field not in properties:
                continue
            for variant in properties[field].get("anyOf", [properties[field]]):
                if variant.get("type") == "integer":
                    variant["maximum"] = value
            properties[field]["description"] = f"at most {value}: {why}"
