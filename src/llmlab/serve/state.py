"""What every route of the server shares: its options, the one batcher, metrics, the tokenizer and the feedback store,
and the checks every generation request goes through."""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from llmlab.engine.batcher import ContinuousBatcher, Request
from llmlab.serve.feedback import FeedbackStore
from llmlab.serve.error_replies import APIError
from llmlab.serve.metrics import Metrics
from llmlab.engine.speculative import SpeculativeStats
from llmlab.serve.speculative import SpeculativeRequest, can_speculate, submit_speculative

log = logging.getLogger("llmlab.serve")


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
    speculate: str | None = None  # lookup | self | draft:PATH: n=1 unconstrained requests decode speculatively
    embedding_model: str | None = None  # served at /v1/embeddings (a name or model directory); None: no embeddings


class Mailbox:
    """Events from the batcher's thread to asyncio queues on the event loop, with one wake-up of the loop for all the
    events that arrive before it runs (a step's 16 deltas), not one each.

    The wake-up is a byte written to a pipe the loop watches, by a C write that keeps the GIL: the loop wakes in
    epoll but runs only once the batcher lets go of the GIL, in its next decode step. loop.call_soon_threadsafe's
    own write releases the GIL, the woken loop takes it, and the batcher waited for the loop's whole pass before it
    could start the step (py-spy, 1 client: ~5% of the batcher's time in that write)."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.lock = threading.Lock()
        self.pending: deque = deque()
        self.scheduled = False
        self.read_fd, self.write_fd = os.pipe()
        os.set_blocking(self.read_fd, False)
        os.set_blocking(self.write_fd, False)
        loop.add_reader(self.read_fd, self.woken)  # (a Mailbox is made in the loop's thread)

    def put(self, queue: asyncio.Queue, event):
        """Called from any thread."""
        with self.lock:
            self.pending.append((queue, event))
            if self.scheduled:
                return
            self.scheduled = True
        _write_keeping_gil(self.write_fd, b"!", 1)  # (a full pipe or a closed loop: nothing to wake)

    def woken(self):
        try:
            os.read(self.read_fd, 4096)
        except BlockingIOError:
            pass
        self.deliver()

    def close(self):
        """Stop watching the pipe and close it (once nothing can put any more: the batcher has stopped)."""
        if not self.loop.is_closed():
            self.loop.remove_reader(self.read_fd)
        os.close(self.read_fd)
        os.close(self.write_fd)

    def deliver(self):
        """In the event loop: hand every pending event to its queue."""
        with self.lock:
            pending, self.pending = self.pending, deque()
            self.scheduled = False
        for queue, event in pending:
            queue.put_nowait(event)


_write_keeping_gil = ctypes.PyDLL(None).write  # libc's write(fd, buf, n), called without releasing the GIL
_write_keeping_gil.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t]


class ServerState:
    """One per app (app.state.server): routes reach it through their request's app."""

    def __init__(self, llm, options: ServerOptions):
        self.llm, self.options = llm, options
        self.tokenizer = llm.tokenizer
        self.max_len = min(options.max_len, llm.engine.context_len)
        self.batcher = ContinuousBatcher(llm.engine, max_batch=options.max_batch, max_len=self.max_len,
                                         prefix_cache=options.prefix_cache)
        self.metrics = Metrics()
        self.created = int(time.time())
        self.store: FeedbackStore | None = None
        self.json_vocab = None  # token texts for JSON-constrained decoding, built on first use
        self.mailbox: Mailbox | None = None  # the batcher's events on their way to the event loop
        self.speculative = None
        if options.speculate:
            from llmlab.engine.speculative import SpeculativeDecoder
            self.speculative = SpeculativeDecoder(llm.engine, options.speculate)
        self.embedder = None
        if options.embedding_model:
            from llmlab.rag.embed import Embedder
            self.embedder = Embedder(options.embedding_model)

    def open(self):
        self.batcher.start()
        self.store = FeedbackStore(self.options.db) if self.options.db else None

    def close(self):
        self.batcher.stop()
        if self.mailbox is not None:
            self.mailbox.close()
            self.mailbox = None
        if self.store is not None:
            self.store.close()

    @property
    def sampling_defaults(self) -> dict:
        """The model's own sampling defaults (its generation_config.json), as SamplingParams fields."""
        return dict(getattr(self.llm, "sampling_defaults", None) or {})

    # ---- checks: each raises APIError with the 4xx a client can act on --------------------------------------

    def check_model(self, name: str):
        if name != self.options.model_name:
            raise APIError(404, f"the model '{name}' does not exist; this server serves '{self.options.model_name}'",
                           param="model", code="model_not_found")

    def check_budget(self, prompt_len: int, max_tokens: int | None, param: str) -> int:
        """The completion budget: max_tokens, or all the room left when it is not given."""
        if prompt_len >= self.max_len:
            raise APIError(400, f"the prompt is {prompt_len} tokens but this server's context length is "
                           f"{self.max_len} tokens, which leaves no room to generate", param="messages",
                           code="context_length_exceeded")
        if max_tokens is None:
            return self.max_len - prompt_len
        if prompt_len + max_tokens > self.max_len:
            raise APIError(400, f"this server's context length is {self.max_len} tokens, but "
                           f"{prompt_len + max_tokens} were requested ({prompt_len} in the prompt + {max_tokens} in "
                           f"{param}); lower {param} to at most {self.max_len - prompt_len}", param=param,
                           code="context_length_exceeded")
        return max_tokens

    def check_n(self, n: int) -> int:
        if n > self.options.max_batch:
            raise APIError(400, f"n is {n} but this server generates at most {self.options.max_batch} at once",
                           param="n", code="invalid_value")
        return n

    def check_queue(self, count: int = 1):
        if self.batcher.queue_depth + count > self.options.max_queue:
            self.metrics.rejected_queue_full += 1
            raise APIError(429, f"the server is busy ({self.batcher.queue_depth} requests waiting); retry shortly",
                           "rate_limit_error", code="queue_full", headers={"Retry-After": "1"})

    # ---- the batcher, from the event loop --------------------------------------------------------------------

    def submit(self, prompt_ids, params, n, constraint_factory=None):
        """Submit to the batcher; returns (request, asyncio queue of its events). Call from the event loop."""
        loop = asyncio.get_running_loop()
        if self.mailbox is None or self.mailbox.loop is not loop:
            self.mailbox = Mailbox(loop)
        mailbox, events = self.mailbox, asyncio.Queue()

        def sink(event):
            mailbox.put(events, event)

        if self.speculative is not None and can_speculate(n, constraint_factory, params):
            req = SpeculativeRequest(prompt_ids, params, sink, timeout=self.options.request_timeout)
            return submit_speculative(self.batcher, self.speculative, self.metrics, req), events
        req = self.batcher.submit(Request(prompt_ids=prompt_ids, params=params, sink=sink, n=n,
                                          constraint_factory=constraint_factory,
                                          timeout=self.options.request_timeout))
        return req, events

    def cancel(self, jobs):
        """Stop every unfinished job (its client went away); counts one cancelled request."""
        unfinished = [req for req, _ in jobs if not req.done]
        for req in unfinished:
            self.batcher.cancel(req)
        if unfinished:
            self.metrics.cancelled += 1

    # ---- reporting -----------------------------------------------------------------------------------------

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def usage(self, prompt_tokens: int, completion_tokens: int, requests=()) -> dict:
        self.metrics.count_tokens(prompt_tokens, completion_tokens)
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                 "total_tokens": prompt_tokens + completion_tokens}
        speculated = [r.stats for r in requests if isinstance(r, SpeculativeRequest)]
        if speculated:  # an extra field (clients ignore what they do not know): how the drafts did
            total = SpeculativeStats()
            for stats in speculated:
                total.add(stats)
            usage["speculative"] = total.report()
        return usage

    def log_request(self, kind, rid, prompt_tokens, completion_tokens, started, prompt_text=None):
        extra = f" prompt={prompt_text!r}" if self.options.log_prompts and prompt_text is not None else ""
        log.info("%s %s prompt_tokens=%d completion_tokens=%d seconds=%.3f%s", kind, rid, prompt_tokens,
                 completion_tokens, time.monotonic() - started, extra)
