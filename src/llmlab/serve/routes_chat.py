"""POST /v1/chat/completions: a conversation through the chat template, optionally JSON-constrained or calling tools
(engine/tools.py), streamed or not."""

from __future__ import annotations

import time
import uuid

from fastapi import APIRouter, Request as HTTPRequest

from llmlab.engine.constraint import TokenVocab, compile_schema, grammar_constraint_factory
from llmlab.engine.tools import (ToolCallStream, check_tools, choose_tools, parse_tool_calls, render_messages,
                                tool_constraint_factory, tool_grammar)
from llmlab.errors import LLMLabError
from llmlab.serve import schemas as S
from llmlab.serve.generation import (STREAM_RESPONSES, StreamChunks, chat_logprobs, relay, sampling_params,
                                     streaming_response, wait_for)
from llmlab.serve.error_replies import APIError
from llmlab.serve.state import ServerState

router = APIRouter()


def json_factory(state: ServerState, response_format: S.ResponseFormat | None, budget: int):
    """A maker of JsonConstraints for response_format, or None for free text."""
    if response_format is None or response_format.type == "text":
        return None
    schema = None
    if response_format.type == "json_schema":
        if response_format.json_schema is None or response_format.json_schema.schema_ is None:
            raise APIError(400, "response_format json_schema needs json_schema.schema",
                           param="response_format.json_schema")
        schema = response_format.json_schema.schema_
    try:
        grammar = compile_schema(schema)
    except LLMLabError as e:
        raise APIError(400, str(e), param="response_format") from None
    if state.json_vocab is None:  # built once, on first use
        state.json_vocab = TokenVocab(state.tokenizer)
    try:
        return grammar_constraint_factory(state.json_vocab, grammar, budget)
    except LLMLabError as e:  # the budget is too small for the shortest value the schema allows
        raise APIError(400, str(e), param="max_tokens") from None


def tool_setup(state: ServerState, body: S.ChatCompletionRequest) -> tuple[str, dict]:
    """(mode, tools the answer may call) for the request's tools and tool_choice; 400 for bad ones."""
    tools = [t.model_dump() for t in body.tools or []]
    choice = body.tool_choice.model_dump() if isinstance(body.tool_choice, S.NamedToolChoice) else body.tool_choice
    try:
        mode, callable_tools = choose_tools(check_tools(tools), choice)
    except LLMLabError as e:
        raise APIError(400, str(e), param="tool_choice" if "tool_choice" in str(e) else "tools") from None
    if mode != "none" and body.response_format is not None and body.response_format.type != "text":
        raise APIError(400, "response_format cannot be combined with tool calls; give tool_choice none or drop one",
                       param="response_format")
    return mode, callable_tools


def tool_factory(state: ServerState, mode: str, tools: dict, parallel: bool, budget: int):
    """A maker of constraints that decode tool calls under their schemas, or None (tool_choice none)."""
    try:
        grammar = tool_grammar(mode, tools, parallel)
        if grammar is None:
            return None
        if state.json_vocab is None:
            state.json_vocab = TokenVocab(state.tokenizer)
        return tool_constraint_factory(state.json_vocab, grammar, budget)
    except LLMLabError as e:
        raise APIError(400, str(e), param="max_tokens" if "max_tokens" in str(e) else "tools") from None


def chat_prompt(state: ServerState, body: S.ChatCompletionRequest, tools: dict | None = None) -> list[int]:
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text(),
                 **({"tool_calls": [c.model_dump() for c in m.tool_calls]} if m.tool_calls else {})}
                for m in body.messages]
    if body.tools or any(m["role"] == "tool" or "tool_calls" in m for m in messages):
        defined = {t.function.name for t in body.tools or []}
        for i, m in enumerate(body.messages):  # calls in the history must name a tool the request defines
            for call in m.tool_calls or []:
                if body.tools and call.function.name not in defined:
                    raise APIError(400, f"messages[{i}] calls the function {call.function.name!r}, which is not "
                                   "among the tools", param=f"messages.{i}.tool_calls")
        try:
            messages = render_messages(messages, tools or {})
        except LLMLabError as e:
            raise APIError(400, str(e), param="messages") from None
    try:
        return state.llm.prompt_ids(messages)
    except Exception as e:  # a template that refuses a conversation (e.g. roles out of order)
        raise APIError(400, f"the chat template cannot render these messages: {e}", param="messages") from None


@router.post("/v1/chat/completions", response_model=S.ChatCompletion, responses=STREAM_RESPONSES)
async def chat_completions(body: S.ChatCompletionRequest, http: HTTPRequest):
    state: ServerState = http.app.state.server
    started = time.monotonic()
    state.check_model(body.model)
    mode, tools = tool_setup(state, body)
    prompt_ids = chat_prompt(state, body, tools)
    param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    max_tokens = getattr(body, param)
    if max_tokens == 0:
        raise APIError(400, f"{param} must be at least 1", param=param, code="invalid_value")
    budget = state.check_budget(len(prompt_ids), max_tokens, param)
    n = state.check_n(body.n)
    factory = (json_factory(state, body.response_format, budget) if mode == "none"
               else tool_factory(state, mode, tools, body.parallel_tool_calls, budget))
    params = sampling_params(state, body, budget, body.logprobs, body.top_logprobs or 0)
    state.check_queue()
    req, events = state.submit(prompt_ids, params, n, factory)
    rid = f"chatcmpl-{uuid.uuid4().hex}"
    prompt_text = body.messages[-1].text()

    def finish() -> dict:
        completion_tokens = sum(s.sampled for s in req.sequences)
        state.log_request("chat", rid, len(prompt_ids), completion_tokens, started, prompt_text)
        return state.usage(len(prompt_ids), completion_tokens, [req])

    if body.stream:
        chunks = StreamChunks(rid, "chat.completion.chunk", state.options.model_name,
                              bool(body.stream_options and body.stream_options.include_usage))
        return streaming_response(relay(state, [(req, events)], chunks, stream_choice(state, body, mode != "none"),
                                        finish, started))

    await wait_for(state, http, [(req, events)])
    choices = [{"index": s.index, **answer(s.text.text, s.finish_reason, mode != "none"),
                "logprobs": chat_logprobs(state, s.tokens) if body.logprobs else None} for s in req.sequences]
    usage = finish()
    state.metrics.observe("latency", time.monotonic() - started)
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": state.options.model_name,
            "choices": choices, "usage": usage}


def answer(text: str, finish_reason: str, tools: bool) -> dict:
    """The choice's message and finish reason: with tools, calls are parsed out (finish reason "tool_calls")."""
    if not tools:
        return {"message": {"role": "assistant", "content": text}, "finish_reason": finish_reason}
    content, calls = parse_tool_calls(text)
    message = {"role": "assistant", "content": content, **({"tool_calls": calls} if calls else {})}
    return {"message": message, "finish_reason": "tool_calls" if calls and finish_reason == "stop" else finish_reason}


def stream_choice(state: ServerState, body: S.ChatCompletionRequest, tools: bool = False):
    """(job, event) -> the chunk's choice: the role comes with each completion's first piece. With tools, the text
    goes through a ToolCallStream per completion, which turns calls into tool_calls deltas."""
    started_roles = set()
    parsers: dict[int, ToolCallStream] = {}

    def choice_for(_job, event):
        index = event[1]
        if event[0] == "delta":
            deltas = parsers.setdefault(index, ToolCallStream()).feed(event[2]) if tools else [{"content": event[2]}]
            return delta_choice(index, deltas, event[3])
        if event[0] == "finish" and event[2] in ("stop", "length"):
            reason = event[2]
            if tools and index in parsers and parsers[index].calls and reason == "stop":
                reason = "tool_calls"
            rest = parsers[index].flush() if tools and index in parsers else []
            choice = delta_choice(index, rest, []) if rest else None
            return [*([choice] if choice else []), {"index": index, "delta": {}, "finish_reason": reason,
                                                    "logprobs": None}]
        return None

    def delta_choice(index, deltas, infos):
        if not deltas and not body.logprobs:
            return None
        delta = {}
        for d in deltas:  # a piece may hold content and a call's start and arguments: merged into one delta
            if "content" in d:
                delta["content"] = delta.get("content", "") + d["content"]
            for call in d.get("tool_calls", []):
                calls = delta.setdefault("tool_calls", [])
                if calls and calls[-1]["index"] == call["index"]:  # the same call: its arguments join
                    calls[-1]["function"]["arguments"] += call["function"]["arguments"]
                else:
                    calls.append({**call, "function": dict(call["function"])})
        if index not in started_roles:
            started_roles.add(index)
            delta["role"] = "assistant"
        return {"index": index, "delta": delta, "finish_reason": None,
                "logprobs": chat_logprobs(state, infos) if body.logprobs else None}

    return choice_for
