"""What runs before any route: API keys, the body size limit and request counting, as plain ASGI middleware.

Plain ASGI rather than Starlette's BaseHTTPMiddleware, which hands routes a `receive` that never reports the
client going away: a route must see http.disconnect to cancel the generation it started.
"""

from __future__ import annotations

import secrets

from llmlab.serve.error_replies import error_response

PROTECTED = ("/v1/", "/metrics", "/tokenize", "/detokenize", "/tokenizer_info")
DRAIN_BYTES = 64_000_000  # an oversized body is read and dropped up to this size before the 413 goes out
COUNTED_PATHS = {"/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/feedback", "/tokenize", "/detokenize"}


class RequireAPIKey:
    """With keys set, the API needs 'Authorization: Bearer KEY' (the web page and /health stay open)."""

    def __init__(self, app, api_keys: list[str], metrics):
        self.app, self.metrics = app, metrics
        self.keys = [k.encode() for k in api_keys]

    def allowed(self, scope) -> bool:
        header = dict(scope.get("headers") or []).get(b"authorization", b"")
        scheme, _, key = header.partition(b" ")
        # bytes, not str: compare_digest refuses non-ASCII str, and a key like "café" must get a 401, not a 500
        return scheme.lower() == b"bearer" and any(secrets.compare_digest(key.strip(), k) for k in self.keys)

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and self.keys and scope["path"].startswith(PROTECTED) and not self.allowed(scope):
            self.metrics.count_request(scope["path"], 401)
            response = error_response(401, "invalid or missing API key: send 'Authorization: Bearer <key>'",
                                      "authentication_error", code="invalid_api_key")
            return await response(scope, receive, send)
        await self.app(scope, receive, send)


class CountRequests:
    """llmlab_requests_total by endpoint and status."""

    def __init__(self, app, metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] not in COUNTED_PATHS:
            return await self.app(scope, receive, send)

        async def counting_send(message):
            if message["type"] == "http.response.start":
                self.metrics.count_request(scope["path"], message["status"])
            await send(message)

        await self.app(scope, receive, counting_send)


class BodyLimit:
    """Refuse request bodies over max_bytes with 413, by Content-Length or while a chunked body streams in.

    The body is read here in full (it is small: the limit is about a megabyte) and handed to the route as one
    message, so an oversized chunked body is refused before any parser sees it."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_big = error_response(413, f"the request body is larger than this server's limit of {self.max_bytes} "
                                 "bytes", code="request_too_large")
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await too_big(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if not message.get("more_body", False):
                break
            if size > self.max_bytes:
                chunks = []  # keep reading, to answer a client that is still sending: it would miss the 413
                if size > DRAIN_BYTES:
                    break
        if size > self.max_bytes:
            return await too_big(scope, receive, send)
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: http.disconnect when the client goes away

        await self.app(scope, replay, send)
