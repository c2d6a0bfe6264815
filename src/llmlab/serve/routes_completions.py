"""POST /v1/completions: raw text or token prompts, with echo and prompt log-probabilities (what lm-eval scores
multiple choice with), streamed or not."""

from __future__ import annotations

import asyncio
import time
import uuid

import torch
from fastapi import APIRouter, Request as HTTPRequest

from llmlab.engine.batcher import TokenInfo
from llmlab.engine.scoring import logprobs_and_top
from llmlab.serve import schemas as S
from llmlab.serve.generation import (STREAM_RESPONSES, StreamChunks, completion_logprobs, relay, sampling_params,
                                     streaming_response, wait_for)
from llmlab.serve.error_replies import APIError
from llmlab.serve.state import ServerState

router = APIRouter()


def completion_prompts(state: ServerState, prompt) -> list[list[int]]:
    """The request's prompts as token ids: a string, a list of strings, a token list, or a list of token lists."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if prompt and isinstance(prompt[0], int):
        prompt = [prompt]
    vocab_size = state.llm.model.config.vocab_size
    out = []
    for p in prompt:
        if isinstance(p, str):
            ids = state.llm.prompt_ids(p, raw=True)
        else:
            ids = list(p)
            bad = [t for t in ids if not 0 <= t < vocab_size]
            if bad:
                raise APIError(400, f"token id {bad[0]} is out of range for this model's {vocab_size}-token "
                               "vocabulary", param="prompt")
        if not ids:
            raise APIError(400, "the prompt is empty", param="prompt")
        out.append(ids)
    return out


@torch.no_grad()
def score_prompt(llm, ids: list[int], k: int) -> list[TokenInfo]:
    """Each prompt token with its logprob given the tokens before it (none for the first) and the k most likely
    tokens there. Runs in the batcher's thread (batcher.call): the model is not used by two threads at once."""
    logits = llm.model(torch.tensor([ids], device=llm.engine.device))[0, :-1]
    chosen, top = logprobs_and_top(logits, torch.tensor(ids[1:], device=logits.device), k)
    chosen = chosen.tolist()
    tops = [dict(zip(i, v)) for v, i in zip(top[0].tolist(), top[1].tolist())] if top is not None else None
    return [TokenInfo(ids[0])] + [TokenInfo(t, chosen[j], tops[j] if tops else None) for j, t in enumerate(ids[1:])]


def budget_of(state: ServerState, body: S.CompletionRequest, prompts) -> list[int]:
    """Tokens to generate per prompt (0: only score the echoed prompt)."""
    if body.max_tokens == 0 and not body.echo:
        raise APIError(400, "max_tokens must be at least 1 (0 is only allowed with echo, to score the prompt)",
                       param="max_tokens", code="invalid_value")
    if body.max_tokens == 0 and body.stream:
        raise APIError(400, "max_tokens 0 cannot be streamed", param="max_tokens", code="invalid_value")
    if body.max_tokens == 0:
        return [0] * len(prompts)
    return [state.check_budget(len(p), body.max_tokens, "max_tokens") for p in prompts]


@router.post("/v1/completions", response_model=S.Completion, responses=STREAM_RESPONSES)
async def completions(body: S.CompletionRequest, http: HTTPRequest):
    state: ServerState = http.app.state.server
    started = time.monotonic()
    state.check_model(body.model)
    prompts = completion_prompts(state, body.prompt)
    budgets = budget_of(state, body, prompts)
    n, k = state.check_n(body.n), body.logprobs
    if any(budgets):
        state.check_queue(len(prompts))
    # the prompt's own logprobs, when echoed: scored first, so a streamed answer can start with them
    scores = None
    if body.echo and k is not None:
        scores = [await asyncio.wrap_future(state.batcher.call(score_prompt, state.llm, ids, k)) for ids in prompts]
    jobs = [state.submit(ids, sampling_params(state, body, budget, k is not None, k or 0), n)
            for ids, budget in zip(prompts, budgets) if budget]
    rid = f"cmpl-{uuid.uuid4().hex}"

    def finish() -> dict:
        completion_tokens = sum(s.sampled for req, _ in jobs for s in req.sequences)
        prompt_tokens = sum(map(len, prompts))
        state.log_request("completion", rid, prompt_tokens, completion_tokens, started, body.prompt)
        return state.usage(prompt_tokens, completion_tokens, [req for req, _ in jobs])

    if body.stream:
        chunks = StreamChunks(rid, "text_completion", state.options.model_name,
                              bool(body.stream_options and body.stream_options.include_usage))
        return streaming_response(relay(state, jobs, chunks, stream_choice(state, body, prompts, scores), finish,
                                        started))

    await wait_for(state, http, jobs)
    job_sequences = iter([req.sequences for req, _ in jobs])
    choices = []
    for j, ids in enumerate(prompts):
        for s in (next(job_sequences) if budgets[j] else [None] * n):
            prefix = state.tokenizer.decode(ids) if body.echo else ""
            infos = (scores[j] if scores else []) + (s.tokens if s else [])
            choices.append({"index": len(choices), "text": prefix + (s.text.text if s else ""),
                            "finish_reason": s.finish_reason if s else "length",
                            "logprobs": completion_logprobs(state, infos, k) if k is not None else None})
    usage = finish()
    state.metrics.observe("latency", time.monotonic() - started)
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": state.options.model_name,
            "choices": choices, "usage": usage}


def stream_choice(state: ServerState, body: S.CompletionRequest, prompts, scores):
    """(job, event) -> the chunk's choice. The first piece of each completion carries the echoed prompt (and its
    scores); logprobs come with every piece, their text offsets counting from the start of the choice's text."""
    n, k = body.n, body.logprobs
    offsets = {}  # choice index -> text offset of its next token, as the non-streamed response counts it

    def choice_for(j, event):
        index = j * n + event[1]
        if event[0] == "finish":
            if event[2] not in ("stop", "length"):
                return None
            return {"index": index, "text": "", "logprobs": None, "finish_reason": event[2]}
        text, infos = event[2], list(event[3])
        if index not in offsets:
            offsets[index] = 0
            if body.echo:
                text = state.tokenizer.decode(prompts[j]) + text
                infos = (scores[j] if scores else []) + infos
        logprobs = None
        if k is not None:
            logprobs = completion_logprobs(state, infos, k, offsets[index])
            offsets[index] += sum(len(token) for token in logprobs["tokens"])
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": None}

    return choice_for
