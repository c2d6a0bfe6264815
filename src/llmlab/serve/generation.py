"""What chat and completions share: the one request -> SamplingParams builder, waiting for the batcher (cancelling
when the client goes away, streamed or not), the one stream-chunk builder and the log-probability bodies."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, fields

from llmlab.engine import SamplingParams
from llmlab.engine.batcher import TokenInfo
from llmlab.serve import schemas as S
from llmlab.serve.error_replies import ERRORS, APIError
from llmlab.serve.state import ServerState

SAMPLING_FIELDS = {f.name for f in fields(SamplingParams)}
REQUEST_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")  # a request may override these
DECIDED_BY_REQUEST = {"max_new_tokens", "stop", "seed", "logprobs", "top_logprobs"}
# chat and completions answer JSON, or server-sent events with stream=true
STREAM_RESPONSES = {200: {"content": {"application/json": {}, "text/event-stream": {}}}, **ERRORS}


def sampling_params(state: ServerState, body: S.SamplingFields, budget: int, logprobs: bool = False,
                    top_logprobs: int = 0) -> SamplingParams:
    """The request's sampling fields over the model's defaults (generation_config.json) over llmlab's."""
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(body, name) not in (None, 0):
            raise APIError(400, f"{name} is not implemented (only 0 is accepted); use repetition_penalty",
                           param=name, code="unsupported_parameter")
    options = {k: v for k, v in state.sampling_defaults.items()
               if k in SAMPLING_FIELDS and k not in DECIDED_BY_REQUEST}
    options.update({k: getattr(body, k) for k in REQUEST_FIELDS if getattr(body, k) is not None})
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    return SamplingParams(max_new_tokens=budget, stop=[s for s in stop if s], seed=body.seed, logprobs=logprobs,
                          top_logprobs=top_logprobs, **options).validate()


def check_finished(state: ServerState, req):
    reasons = {s.finish_reason for s in req.sequences}
    if "timeout" in reasons:
        raise APIError(408, f"the request took longer than the server's {state.options.request_timeout:g} s limit",
                       "timeout_error", code="timeout")
    if "error" in reasons:
        raise APIError(500, "generation failed", "server_error")


# ---- waiting for the batcher -------------------------------------------------------------------------------------


async def until_disconnected(http):
    """Returns when the client goes away (the body is read already: the next ASGI message is the disconnect)."""
    while (await http.receive())["type"] != "http.disconnect":
        pass


async def all_finished(jobs):
    for req, events in jobs:
        left = req.n  # one "finish" event per completion, also for a request cancelled while it waited
        while left:
            left -= (await events.get())[0] == "finish"


async def wait_for(state: ServerState, http, jobs):
    """Wait until every (request, events) job has finished; if the client goes away first, cancel them all
    (freeing their batch rows) and answer 499, which no one reads but the metrics count."""
    finished = asyncio.ensure_future(all_finished(jobs))
    gone = asyncio.ensure_future(until_disconnected(http))
    try:
        await asyncio.wait({finished, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        finished.cancel()
        gone.cancel()
    if not (finished.done() and not finished.cancelled()):
        state.cancel(jobs)
        raise APIError(499, "the client closed the connection", code="client_closed")
    for req, _ in jobs:
        check_finished(state, req)


# ---- streaming ---------------------------------------------------------------------------------------------------


@dataclass
class StreamChunks:
    """Builds every chunk of one stream, for chat ("chat.completion.chunk") and completions ("text_completion")."""
    rid: str
    object: str
    model: str
    include_usage: bool

    def chunk(self, choices: list[dict], usage: dict | None = None) -> dict:
        out = {"id": self.rid, "object": self.object, "created": int(time.time()), "model": self.model,
               "choices": choices}
        if self.include_usage:
            out["usage"] = usage  # null on every chunk but the last, as OpenAI
        return out


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def stream_error(message: str, type: str, code: str | None = None) -> str:
    return sse({"error": {"message": message, "type": type, "param": None, "code": code}})


async def relay(state: ServerState, jobs, chunks: StreamChunks, choice_for, finish, started):
    """Server-sent events for running jobs: a chunk per text piece, then the usage chunk and [DONE].
    choice_for(job index, event) -> a choice dict, a list of them or None; finish() -> usage, called once all are done.
    A client that goes away stops this generator (Starlette cancels it), and the finally cancels the jobs."""
    if len(jobs) == 1:  # one request (every chat request): read its events directly, no task in between
        only = jobs[0][1]

        async def next_event():
            return 0, await only.get()
        pumps = []
    else:  # several prompts (completions): one task per request funnels its events into one queue
        queue: asyncio.Queue = asyncio.Queue()
        next_event = queue.get

        async def pump(k, events):
            while True:
                await queue.put((k, await events.get()))

        pumps = [asyncio.create_task(pump(k, events)) for k, (_, events) in enumerate(jobs)]
    first = last = None
    remaining = sum(req.n for req, _ in jobs)  # completions whose "finish" event has not come yet
    try:
        while remaining:
            k, event = await next_event()
            remaining -= event[0] == "finish"
            if event[0] == "error":
                yield stream_error("generation failed", "server_error") + "data: [DONE]\n\n"
                return
            if event[0] == "finish" and event[2] == "timeout":
                yield stream_error(f"the request took longer than the server's {state.options.request_timeout:g} "
                                   "s limit", "timeout_error", "timeout") + "data: [DONE]\n\n"
                return
            choice = choice_for(k, event)
            if choice is None:
                continue
            if event[0] == "delta":
                now = time.monotonic()
                state.metrics.observe("ttft" if first is None else "itl", now - (last or started))
                first, last = first or now, now
            for one in choice if isinstance(choice, list) else [choice]:  # a tool call's end may add a chunk
                yield sse(chunks.chunk([one]))
        usage = finish()
        if chunks.include_usage:
            yield sse(chunks.chunk([], usage))
        yield "data: [DONE]\n\n"
        state.metrics.observe("latency", time.monotonic() - started)
    finally:
        for task in pumps:
            task.cancel()
        state.cancel(jobs)


def streaming_response(generator):
    from fastapi.responses import StreamingResponse
    return StreamingResponse(generator, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


# ---- log-probabilities -------------------------------------------------------------------------------------------


def chat_logprobs(state: ServerState, infos: list[TokenInfo]) -> dict:
    content = []
    for info in infos:
        text = state.token_text(info.id)
        tops = [{"token": state.token_text(t), "logprob": lp, "bytes": list(state.token_text(t).encode())}
                for t, lp in (info.top or {}).items()]
        content.append({"token": text, "logprob": info.logprob if info.logprob is not None else 0.0,
                        "bytes": list(text.encode()), "top_logprobs": tops})
    return {"content": content}


def completion_logprobs(state: ServerState, infos: list[TokenInfo], k: int, offset: int = 0) -> dict:
    """The completions API's logprobs for these tokens (prompt tokens too, when echoed); text offsets count from
    `offset`, the length of the choice's text before them. k > 0 also lists the k most likely tokens (and the
    chosen one, as OpenAI does)."""
    tokens, lps, tops, offsets = [], [], [], []
    for info in infos:
        text = state.token_text(info.id)
        tokens.append(text)
        lps.append(info.logprob)
        offsets.append(offset)
        offset += len(text)
        if k and info.top is not None:
            top = {state.token_text(t): v for t, v in info.top.items()}
            top.setdefault(text, info.logprob)
            tops.append(top)
        else:
            tops.append(None)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops if k else None, "text_offset": offsets}
