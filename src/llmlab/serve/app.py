"""The OpenAI-compatible HTTP server: FastAPI routes in front of one continuous batcher.

Every route validates its input into a clear 4xx (OpenAI's error body), turns the request into token ids
and SamplingParams, submits it to the batcher and relays the batcher's events: as one JSON body, or as
server-sent events when stream=true. All model work happens in the batcher's thread.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from llmlab.engine import SamplingParams
from llmlab.engine.batcher import ContinuousBatcher, Request
from llmlab.errors import LLMLabError
from llmlab.serve import schemas as S
from llmlab.serve.feedback import FeedbackStore
from llmlab.serve.json_constraint import JsonConstraint, TokenVocab, compile_schema
from llmlab.serve.metrics import Metrics

log = logging.getLogger("llmlab.serve")
STATIC = Path(__file__).parent / "static"


@dataclass
class ServerOptions:
    model_name: str = "smollm2"  # the id clients put in "model"
    api_keys: list[str] = field(default_factory=list)  # empty: no authentication
    max_batch: int = 16  # rows generating at once
    max_len: int = 2048  # tokens per row (prompt + completion): the context the server offers
    max_queue: int = 64  # requests waiting for a row before new ones get 429
    request_timeout: float = 300.0  # seconds from arrival to the last token
    max_body_bytes: int = 1_000_000
    db: str | None = None  # SQLite file for the web chat's feedback; None: feedback is off
    log_prompts: bool = False  # prompt text in the log (off: only sizes and timings)
    prefix_cache: bool = True


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers


def error_response(status: int, message: str, type: str = "invalid_request_error", param=None, code=None,
                   headers=None) -> JSONResponse:
    body = {"error": {"message": message, "type": type, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


COUNTED_PATHS = {"/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/feedback", "/tokenize", "/detokenize"}
ERRORS = {status: {"model": S.ErrorBody} for status in (400, 401, 404, 408, 413, 429)}


def create_app(llm, options: ServerOptions | None = None) -> FastAPI:
    """The FastAPI app serving `llm` (an llmlab.api.LLM). The batcher thread runs while the app is up."""
    options = options or ServerOptions()
    tokenizer = llm.tokenizer
    max_len = min(options.max_len, llm.engine.context_len)
    batcher = ContinuousBatcher(llm.engine, max_batch=options.max_batch, max_len=max_len,
                                prefix_cache=options.prefix_cache)
    metrics = Metrics()
    created = int(time.time())
    vocab = TokenVocab(tokenizer)  # token texts for JSON-constrained decoding, built on first use
    store: FeedbackStore | None = None

    @asynccontextmanager
    async def lifespan(app):
        nonlocal store
        batcher.start()
        store = FeedbackStore(options.db) if options.db else None
        yield
        batcher.stop()
        if store is not None:
            store.close()

    app = FastAPI(title="llmlab", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible API for an llmlab model, and a web chat at /.")
    app.state.batcher, app.state.metrics, app.state.options = batcher, metrics, options

    # ---- errors: always OpenAI's body, never a 5xx for bad input ----------------------------------------------

    @app.exception_handler(APIError)
    async def on_api_error(request, e: APIError):
        return error_response(e.status, e.message, e.type, e.param, e.code, e.headers)

    @app.exception_handler(LLMLabError)
    async def on_llmlab_error(request, e: LLMLabError):
        return error_response(400, str(e))

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request, e: RequestValidationError):
        first = e.errors()[0]
        loc = [str(part) for part in first.get("loc", ()) if part != "body"]
        if first.get("type") == "json_invalid":
            return error_response(400, f"the request body is not valid JSON: {first.get('ctx', {}).get('error', '')}"
                                  .rstrip(": "), code="invalid_json")
        param = ".".join(loc) or None
        message = f"{param}: {first['msg']}" if param else first["msg"]
        if first.get("type") == "missing" and param:
            message = f"'{param}' is required"
        return error_response(400, message, param=param, code="invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return error_response(e.status_code, str(e.detail), kind)

    @app.exception_handler(Exception)
    async def on_bug(request, e: Exception):
        log.exception("internal error")
        return error_response(500, "internal server error", "server_error")

    # ---- security: size limit and API keys, before any route runs ---------------------------------------------

    app.add_middleware(BodyLimit, max_bytes=options.max_body_bytes)

    @app.middleware("http")
    async def authenticate(request: HTTPRequest, call_next):
        if options.api_keys and request.url.path.startswith(("/v1/", "/metrics", "/tokenize", "/detokenize",
                                                              "/tokenizer_info")):
            scheme, _, key = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not any(secrets.compare_digest(key.strip(), k)
                                                      for k in options.api_keys):
                metrics.count_request(request.url.path, 401)
                return error_response(401, "invalid or missing API key: send 'Authorization: Bearer <key>'",
                                      "authentication_error", code="invalid_api_key")
        response = await call_next(request)
        if request.url.path in COUNTED_PATHS:
            metrics.count_request(request.url.path, response.status_code)
        return response

    # ---- helpers ----------------------------------------------------------------------------------------------

    def check_model(name: str):
        if name != options.model_name:
            raise APIError(404, f"the model '{name}' does not exist; this server serves '{options.model_name}'",
                           param="model", code="model_not_found")

    def check_budget(prompt_len: int, max_tokens: int | None, param: str) -> int:
        """The completion budget: max_tokens, or all the room left when it is not given."""
        if prompt_len >= max_len:
            raise APIError(400, f"the prompt is {prompt_len} tokens but this server's context length is {max_len} "
                           "tokens, which leaves no room to generate", param="messages", code="context_length_exceeded")
        if max_tokens is None:
            return max_len - prompt_len
        if prompt_len + max_tokens > max_len:
            raise APIError(400, f"this server's context length is {max_len} tokens, but {prompt_len + max_tokens} "
                           f"were requested ({prompt_len} in the prompt + {max_tokens} in {param}); lower {param} "
                           f"to at most {max_len - prompt_len}", param=param, code="context_length_exceeded")
        return max_tokens

    def check_queue(count: int = 1):
        if batcher.queue_depth + count > options.max_queue:
            metrics.rejected_queue_full += 1
            raise APIError(429, f"the server is busy ({batcher.queue_depth} requests waiting); retry shortly",
                           "rate_limit_error", code="queue_full", headers={"Retry-After": "1"})

    def stop_list(stop) -> list[str]:
        stop = [stop] if isinstance(stop, str) else list(stop or [])
        return [s for s in stop if s]

    async def submit(prompt_ids, params, n, constraint_factory=None):
        """Submit to the batcher; returns (request, asyncio queue of its events)."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def sink(event):
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the event loop is gone (server shutting down)
                pass

        req = batcher.submit(Request(prompt_ids=prompt_ids, params=params, sink=sink, n=n,
                                     constraint_factory=constraint_factory, timeout=options.request_timeout))
        return req, events

    async def collect(http: HTTPRequest, jobs) -> None:
        """Wait until every (request, events) job has finished, cancelling all if the client goes away."""
        pending = {id(req): (req, events) for req, events in jobs}
        while pending:
            for key, (req, events) in list(pending.items()):
                while not events.empty():
                    events.get_nowait()
                if req.done:
                    del pending[key]
            if not pending:
                break
            if await http.is_disconnected():
                for req, _ in jobs:
                    batcher.cancel(req)
                metrics.cancelled += 1
                return
            await asyncio.sleep(0.01)

    def check_finished(req: Request):
        reasons = {s.finish_reason for s in req.sequences}
        if "timeout" in reasons:
            raise APIError(408, f"the request took longer than the server's {options.request_timeout:g} s limit",
                           "timeout_error", code="timeout")
        if "error" in reasons:
            raise APIError(500, "generation failed", "server_error")

    def usage(prompt_tokens: int, completion_tokens: int) -> dict:
        metrics.count_tokens(prompt_tokens, completion_tokens)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    def token_text(token_id: int) -> str:
        return tokenizer.decode([token_id])

    def chat_logprobs(infos) -> dict:
        content = []
        for info in infos:
            text = token_text(info.id)
            tops = [{"token": token_text(t), "logprob": lp, "bytes": list(token_text(t).encode())}
                    for t, lp in (info.top or {}).items()]
            content.append({"token": text, "logprob": info.logprob if info.logprob is not None else 0.0,
                            "bytes": list(text.encode()), "top_logprobs": tops})
        return {"content": content}

    def log_request(kind, rid, prompt_tokens, completion_tokens, started, prompt_text=None):
        extra = f" prompt={prompt_text!r}" if options.log_prompts and prompt_text is not None else ""
        log.info("%s %s prompt_tokens=%d completion_tokens=%d seconds=%.3f%s", kind, rid, prompt_tokens,
                 completion_tokens, time.monotonic() - started, extra)

    def sse(obj) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    async def relay(http: HTTPRequest, jobs, make_chunk, final_chunks, started):
        """Server-sent events for running jobs: a chunk per text piece, then the closing chunks and [DONE].
        make_chunk(job index, event) -> chunk dict or None. A client that goes away cancels its jobs."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(k, events):
            while True:
                event = await events.get()
                await queue.put((k, event))

        pumps = [asyncio.create_task(pump(k, events)) for k, (_, events) in enumerate(jobs)]
        first, last = None, None
        remaining = sum(req.n for req, _ in jobs)  # completions whose "finish" event has not come yet
        try:
            while remaining:
                k, event = await queue.get()
                if event[0] == "finish":
                    remaining -= 1
                if event[0] == "error":
                    yield sse({"error": {"message": "generation failed", "type": "server_error",
                                         "param": None, "code": None}})
                    break
                if event[0] == "finish" and event[2] == "timeout":
                    yield sse({"error": {"message": f"the request took longer than the server's "
                                         f"{options.request_timeout:g} s limit", "type": "timeout_error",
                                         "param": None, "code": "timeout"}})
                    for req, _ in jobs:
                        batcher.cancel(req)
                    break
                chunk = make_chunk(k, event)
                if chunk is not None:
                    now = time.monotonic()
                    if event[0] == "delta":
                        if first is None:
                            first = now
                            metrics.observe("ttft", now - started)
                        elif last is not None:
                            metrics.observe("itl", now - last)
                        last = now
                    yield sse(chunk)
            else:
                for chunk in final_chunks():
                    yield sse(chunk)
            yield "data: [DONE]\n\n"
            metrics.observe("latency", time.monotonic() - started)
        finally:
            for task in pumps:
                task.cancel()
            for req, _ in jobs:
                if not req.done:
                    batcher.cancel(req)
                    metrics.cancelled += 1

    def json_factory(response_format: S.ResponseFormat | None, budget: int):
        if response_format is None or response_format.type == "text":
            return None
        schema = None
        if response_format.type == "json_schema":
            if response_format.json_schema is None or response_format.json_schema.schema_ is None:
                raise APIError(400, "response_format json_schema needs json_schema.schema",
                               param="response_format.json_schema")
            schema = response_format.json_schema.schema_
        try:
            compiled = compile_schema(schema)
        except LLMLabError as e:
            raise APIError(400, str(e), param="response_format") from None
        needed = JsonConstraint(compiled, vocab).min_tokens()
        if budget < needed:
            raise APIError(400, f"max_tokens is {budget}, but the smallest JSON value this response_format allows "
                           f"takes {needed} tokens", param="max_tokens")
        return lambda: JsonConstraint(compiled, vocab)

    # ---- routes -----------------------------------------------------------------------------------------------

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def web_chat():
        return HTMLResponse((STATIC / "chat.html").read_text())

    @app.get("/health", response_model=S.Health)
    async def health():
        return {"status": "ok", "model": options.model_name, "busy_rows": batcher.busy_rows,
                "queue_depth": batcher.queue_depth}

    @app.get("/metrics", response_class=PlainTextResponse, responses={401: {"model": S.ErrorBody}})
    async def prometheus():
        return PlainTextResponse(metrics.render(batcher.queue_depth, batcher.busy_rows, options.max_batch),
                                 media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", response_model=S.ModelList, responses={401: {"model": S.ErrorBody}})
    async def models():
        return {"object": "list", "data": [{"id": options.model_name, "object": "model", "created": created,
                                            "owned_by": "llmlab"}]}

    @app.get("/v1/models/{model_id}", response_model=S.ModelCard, responses=ERRORS)
    async def model_card(model_id: str):
        check_model(model_id)
        return {"id": options.model_name, "object": "model", "created": created, "owned_by": "llmlab"}

    stream_responses = {200: {"content": {"application/json": {}, "text/event-stream": {}}}, **ERRORS}

    @app.post("/v1/chat/completions", response_model=S.ChatCompletion, responses=stream_responses)
    async def chat_completions(body: S.ChatCompletionRequest, http: HTTPRequest):
        started = time.monotonic()
        check_model(body.model)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in body.messages]
        try:
            prompt_ids = llm.prompt_ids(messages)
        except Exception as e:  # a template that refuses a conversation (e.g. roles out of order)
            raise APIError(400, f"the chat template cannot render these messages: {e}", param="messages") from None
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        if max_tokens == 0:
            raise APIError(400, f"{param} must be at least 1", param=param, code="invalid_value")
        budget = check_budget(len(prompt_ids), max_tokens, param)
        n = check_n(body.n)
        factory = json_factory(body.response_format, budget)
        params = SamplingParams(max_new_tokens=budget, temperature=body.temperature, top_p=body.top_p,
                                stop=stop_list(body.stop), seed=body.seed, logprobs=body.logprobs,
                                top_logprobs=body.top_logprobs or 0)
        check_queue()
        req, events = await submit(prompt_ids, params, n, factory)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        prompt_text = messages[-1]["content"]

        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)

            def chunk(choices, usage_=None):
                out = {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()),
                       "model": options.model_name, "choices": choices}
                if include_usage:
                    out["usage"] = usage_
                return out

            started_roles = set()

            def make_chunk(k, event):
                index = event[1]
                if event[0] == "delta":
                    delta = {"content": event[2]}
                    if index not in started_roles:
                        started_roles.add(index)
                        delta["role"] = "assistant"
                    choice = {"index": index, "delta": delta, "finish_reason": None,
                              "logprobs": chat_logprobs(event[3]) if body.logprobs else None}
                    return chunk([choice])
                if event[0] == "finish" and event[2] in ("stop", "length"):
                    return chunk([{"index": index, "delta": {}, "finish_reason": event[2], "logprobs": None}])
                return None

            def final_chunks():
                completion_tokens = sum(s.sampled for s in req.sequences)
                log_request("chat", rid, len(prompt_ids), completion_tokens, started, prompt_text)
                u = usage(len(prompt_ids), completion_tokens)
                return [chunk([], u)] if include_usage else []

            return StreamingResponse(relay(http, [(req, events)], make_chunk, final_chunks, started),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

        await collect(http, [(req, events)])
        check_finished(req)
        choices = []
        for s in req.sequences:
            choices.append({"index": s.index, "message": {"role": "assistant", "content": s.text.text},
                            "finish_reason": s.finish_reason,
                            "logprobs": chat_logprobs(s.tokens) if body.logprobs else None})
        completion_tokens = sum(s.sampled for s in req.sequences)
        log_request("chat", rid, len(prompt_ids), completion_tokens, started, prompt_text)
        metrics.observe("latency", time.monotonic() - started)
        return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": options.model_name,
                "choices": choices, "usage": usage(len(prompt_ids), completion_tokens)}

    def check_n(n: int) -> int:
        if n > options.max_batch:
            raise APIError(400, f"n is {n} but this server generates at most {options.max_batch} at once",
                           param="n", code="invalid_value")
        return n

    def completion_prompts(prompt) -> list[list[int]]:
        if isinstance(prompt, str):
            prompt = [prompt]
        if prompt and isinstance(prompt[0], int):
            prompt = [prompt]
        out = []
        for p in prompt:
            if isinstance(p, str):
                ids = llm.prompt_ids(p, raw=True)
            else:
                ids = list(p)
                bad = [t for t in ids if not 0 <= t < llm.model.config.vocab_size]
                if bad:
                    raise APIError(400, f"token id {bad[0]} is out of range for this model's "
                                   f"{llm.model.config.vocab_size}-token vocabulary", param="prompt")
            if not ids:
                raise APIError(400, "the prompt is empty", param="prompt")
            out.append(ids)
        return out

    @torch.no_grad()
    def score_prompt(ids: list[int], k: int):
        """Per prompt token: logprob given the tokens before it, and the k most likely tokens there."""
        logp = F.log_softmax(llm.model(torch.tensor([ids], device=llm.engine.device)).float(), dim=-1)[0]
        chosen = logp[:-1].gather(-1, torch.tensor(ids[1:], device=logp.device)[:, None])[:, 0].tolist()
        tops = [None]
        if k:
            top = logp[:-1].topk(k, dim=-1)
            for t, (vals, idx) in enumerate(zip(top.values.tolist(), top.indices.tolist())):
                d = {token_text(i): v for i, v in zip(idx, vals)}
                d.setdefault(token_text(ids[t + 1]), chosen[t])  # OpenAI also lists the actual token
                tops.append(d)
        return [None] + chosen, tops

    @app.post("/v1/completions", response_model=S.Completion, responses=stream_responses)
    async def completions(body: S.CompletionRequest, http: HTTPRequest):
        started = time.monotonic()
        check_model(body.model)
        prompts = completion_prompts(body.prompt)
        max_tokens = body.max_tokens
        if max_tokens == 0 and not body.echo:
            raise APIError(400, "max_tokens must be at least 1 (0 is only allowed with echo, to score the prompt)",
                           param="max_tokens", code="invalid_value")
        if max_tokens == 0 and body.stream:
            raise APIError(400, "max_tokens 0 cannot be streamed", param="max_tokens", code="invalid_value")
        budgets = [check_budget(len(p), max_tokens, "max_tokens") if max_tokens != 0 else 0 for p in prompts]
        n = check_n(body.n)
        k = body.logprobs
        stops = stop_list(body.stop)
        if max_tokens != 0:
            check_queue(len(prompts))
        jobs = []
        for ids, budget in zip(prompts, budgets):
            if budget:
                params = SamplingParams(max_new_tokens=budget, temperature=body.temperature, top_p=body.top_p,
                                        stop=stops, seed=body.seed, logprobs=k is not None, top_logprobs=k or 0)
                jobs.append(await submit(ids, params, n))
        rid = f"cmpl-{uuid.uuid4().hex}"

        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)

            def chunk(choices, usage_=None):
                out = {"id": rid, "object": "text_completion", "created": int(time.time()),
                       "model": options.model_name, "choices": choices}
                if include_usage:
                    out["usage"] = usage_
                return out

            echoed = set()

            def make_chunk(j, event):
                index = j * n + event[1]
                if event[0] == "delta":
                    text = event[2]
                    if body.echo and index not in echoed:
                        echoed.add(index)
                        text = tokenizer.decode(prompts[j]) + text
                    return chunk([{"index": index, "text": text, "logprobs": None, "finish_reason": None}])
                if event[0] == "finish" and event[2] in ("stop", "length"):
                    return chunk([{"index": index, "text": "", "logprobs": None, "finish_reason": event[2]}])
                return None

            def final_chunks():
                completion_tokens = sum(s.sampled for req, _ in jobs for s in req.sequences)
                log_request("completion", rid, sum(map(len, prompts)), completion_tokens, started, body.prompt)
                u = usage(sum(map(len, prompts)) , completion_tokens)
                return [chunk([], u)] if include_usage else []

            return StreamingResponse(relay(http, jobs, make_chunk, final_chunks, started),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

        scores = None
        if body.echo and k is not None:  # the prompt's own logprobs: what lm-eval scores multiple choice with
            scores = [await asyncio.wrap_future(batcher.call(score_prompt, ids, k)) for ids in prompts]
        await collect(http, jobs)
        for req, _ in jobs:
            check_finished(req)
        choices = []
        completion_tokens = 0
        job_iter = iter(jobs)
        for j, ids in enumerate(prompts):
            seqs = next(job_iter)[0].sequences if budgets[j] else [None] * n
            for s in seqs:
                index = len(choices)
                text = s.text.text if s else ""
                completion_tokens += s.sampled if s else 0
                prefix = tokenizer.decode(ids) if body.echo else ""
                logprobs = None
                if k is not None:
                    tokens, lps, tops = [], [], []
                    if body.echo:
                        tokens += [token_text(t) for t in ids]
                        lps += scores[j][0]
                        tops += scores[j][1] if k else [None] * len(ids)
                    for info in (s.tokens if s else []):
                        tokens.append(token_text(info.id))
                        lps.append(info.logprob)
                        if k:
                            d = {token_text(t): v for t, v in (info.top or {}).items()}
                            d.setdefault(token_text(info.id), info.logprob)
                            tops.append(d)
                        else:
                            tops.append(None)
                    offsets, pos = [], 0
                    for t in tokens:
                        offsets.append(pos)
                        pos += len(t)
                    logprobs = {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops if k else None,
                                "text_offset": offsets}
                choices.append({"index": index, "text": prefix + text,
                                "finish_reason": s.finish_reason if s else "length", "logprobs": logprobs})
        prompt_tokens = sum(len(ids) for ids in prompts)
        log_request("completion", rid, prompt_tokens, completion_tokens, started, body.prompt)
        metrics.observe("latency", time.monotonic() - started)
        return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": options.model_name,
                "choices": choices, "usage": usage(prompt_tokens, completion_tokens)}

    # ---- tokenizer endpoints (what lm-evaluation-harness's "remote" tokenizer backend calls) -------------------

    @app.get("/tokenizer_info")
    async def tokenizer_info():
        def tok(i):
            return tokenizer.decode([i]) if i is not None else None
        return {"eos_token": tok(tokenizer.eos_token_id), "bos_token": tok(tokenizer.bos_token_id),
                "pad_token": tok(tokenizer.pad_token_id), "chat_template": tokenizer.chat_template,
                "model_max_length": max_len}

    @app.post("/tokenize", responses=ERRORS)
    async def tokenize(body: S.TokenizeIn):
        return {"tokens": tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)}

    @app.post("/detokenize", responses=ERRORS)
    async def detokenize(body: S.DetokenizeIn):
        bad = [t for t in body.tokens if not 0 <= t < tokenizer.vocab_size]
        if bad:
            raise APIError(400, f"token id {bad[0]} is out of range", param="tokens")
        return {"prompt": tokenizer.decode(body.tokens)}

    # ---- web chat feedback ------------------------------------------------------------------------------------

    @app.post("/v1/feedback", response_model=S.FeedbackOut, responses=ERRORS)
    async def feedback(body: S.FeedbackIn):
        if store is None:
            raise APIError(400, "feedback is off: start the server with a database (llmlab serve --db FILE)",
                           code="feedback_disabled")
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        row = await asyncio.to_thread(store.add, body.conversation_id, body.answer_id, messages, body.answer,
                                      body.rating, body.comment, body.replaces, options.model_name)
        return {"id": row, "stored": True}

    return app


class BodyLimit:
    """Refuse request bodies over max_bytes with 413, by Content-Length or while a chunked body streams in."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        too_big = f"the request body is larger than this server's limit of {self.max_bytes} bytes"
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await error_response(413, too_big, code="request_too_large")(scope, receive, send)
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise APIError(413, too_big, code="request_too_large")
            return message

        await self.app(scope, limited_receive, send)
