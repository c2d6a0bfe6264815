"""The arena: two anonymous models answer one conversation side by side (streamed together), the person votes A, B,
tie or both bad, and only the vote's answer names the models. `install_arena` adds the models to a server made by
create_app (`llmlab arena serve`); on the normal single-model server these routes answer 404."""

from __future__ import annotations

import asyncio
import random
import uuid
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Literal

from fastapi import APIRouter
from fastapi import Request as HTTPRequest
from fastapi.responses import HTMLResponse
from pydantic import BaseModel, Field

from llmlab.engine import SamplingParams
from llmlab.errors import LLMLabError
from llmlab.serve.error_replies import APIError
from llmlab.serve.feedback import AlreadyVoted, UnknownBattle
from llmlab.serve.generation import DECIDED_BY_REQUEST, SAMPLING_FIELDS, sse, stream_error, streaming_response
from llmlab.serve.state import ServerOptions, ServerState

router = APIRouter()
PAGE = Path(__file__).parent / "static" / "arena.html"


class ArenaMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class BattleRequest(BaseModel):
    messages: list[ArenaMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    seed: int | None = Field(None, ge=0)  # answer A samples with this seed, B with seed + 1 (reproducible battles)


class VoteRequest(BaseModel):
    battle_id: str
    vote: Literal["a", "b", "tie", "both_bad"]
    voter: str | None = Field(None, max_length=200)  # who voted, for annotator agreement (optional)


class Arena:
    """The models of an arena server, each with its own ServerState (its batcher), by name."""

    def __init__(self, states: dict[str, ServerState], seed: int | None = None):
        self.states = states
        self.rng = random.Random(seed)

    def pair(self) -> tuple[str, str]:
        """Two different models in random order: which side a model is on says nothing."""
        a, b = self.rng.sample(sorted(self.states), 2)
        return a, b


def install_arena(app, llms: dict, options: ServerOptions, seed: int | None = None) -> Arena:
    """Make an app from create_app(first model) an arena of `llms` ({name: LLM}, two or more): every other model
    gets its own batcher, started and stopped with the app. Votes go to the app's feedback database."""
    if len(llms) < 2:
        raise LLMLabError("the arena needs at least two models (--model A --model B)")
    if not options.db:
        raise LLMLabError("the arena needs a database for its votes (--db)")
    first = app.state.server
    states = {name: first if llm is first.llm else ServerState(llm, replace(options, model_name=name, db=None))
              for name, llm in llms.items()}
    arena = app.state.arena = Arena(states, seed)
    inner = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(the_app):
        async with inner(the_app):  # the first model's batcher and the database
            others = [s for s in states.values() if s is not first]
            for s in others:
                s.batcher.start()
            try:
                yield
            finally:
                for s in others:
                    s.batcher.stop()

    app.router.lifespan_context = lifespan
    return arena


def the_arena(http: HTTPRequest) -> Arena:
    arena = getattr(http.app.state, "arena", None)
    if arena is None:
        raise APIError(404, "this server has no arena: start one with `llmlab arena serve --model A --model B`",
                       code="no_arena")
    return arena


@router.get("/arena", response_class=HTMLResponse, include_in_schema=False)
async def arena_page():
    return HTMLResponse(PAGE.read_text())


def start_side(state: ServerState, messages: list[dict], body: BattleRequest, seed: int | None):
    """Submit one model's answer; returns (request, events)."""
    try:
        prompt_ids = state.llm.prompt_ids(messages)
    except Exception as e:  # a template that refuses a conversation (e.g. roles out of order)
        raise APIError(400, f"the chat template cannot render these messages: {e}", param="messages") from None
    budget = state.check_budget(len(prompt_ids), body.max_tokens, "max_tokens")
    options = {k: v for k, v in state.sampling_defaults.items() if k in SAMPLING_FIELDS and k not in DECIDED_BY_REQUEST}
    if body.temperature is not None:
        options["temperature"] = body.temperature
    params = SamplingParams(max_new_tokens=budget, seed=seed, **options).validate()
    state.check_queue()
    return state.submit(prompt_ids, params, 1)


@router.post("/arena/battle", include_in_schema=False)
async def battle(body: BattleRequest, http: HTTPRequest):
    """Server-sent events {"side": "a"|"b", "delta": text} from both models as they come, then
    {"battle_id": ...} once both are done and stored; the names are not sent."""
    arena = the_arena(http)
    store = http.app.state.server.store
    messages = [m.model_dump() for m in body.messages]
    names = arena.pair()
    states = [arena.states[n] for n in names]
    jobs = [start_side(s, messages, body, None if body.seed is None else body.seed + k) for k, s in enumerate(states)]

    async def events():
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(side, q):
            while True:
                await queue.put((side, await q.get()))

        pumps = [asyncio.create_task(pump(side, q)) for side, (_, q) in zip("ab", jobs)]
        texts, left = {"a": [], "b": []}, 2
        try:
            while left:
                side, event = await queue.get()
                if event[0] == "error" or (event[0] == "finish" and event[2] == "timeout"):
                    yield stream_error("generation failed or took too long", "server_error") + "data: [DONE]\n\n"
                    return
                if event[0] == "delta" and event[2]:
                    texts[side].append(event[2])
                    yield sse({"side": side, "delta": event[2]})
                left -= event[0] == "finish"
            battle_id = f"battle-{uuid.uuid4().hex}"
            store.add_battle(battle_id, messages, names[0], names[1], "".join(texts["a"]), "".join(texts["b"]))
            yield sse({"battle_id": battle_id})
            yield "data: [DONE]\n\n"
        finally:
            for task in pumps:
                task.cancel()
            for state, job in zip(states, jobs):
                state.cancel([job])

    return streaming_response(events())


@router.post("/arena/vote", include_in_schema=False)
async def vote(body: VoteRequest, http: HTTPRequest):
    """Record the vote; the answer names both models."""
    the_arena(http)
    try:
        row = http.app.state.server.store.vote(body.battle_id, body.vote, body.voter)
    except UnknownBattle as e:
        raise APIError(404, str(e), param="battle_id", code="unknown_battle") from None
    except AlreadyVoted as e:
        raise APIError(409, str(e), param="battle_id", code="already_voted") from None
    return {"battle_id": row["battle_id"], "vote": row["vote"], "model_a": row["model_a"], "model_b": row["model_b"]}
