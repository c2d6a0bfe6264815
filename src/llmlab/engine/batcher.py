"""Continuous batching: one loop decodes for every request at once; requests join and leave between steps.

The batcher owns one KV cache of `max_batch` rows. Waiting requests are prefilled (those arriving together in one
left-padded batch) and copied into free rows (n rows for n completions); then every step feeds one token per busy row
through `engine.decode_step`, samples each row with its own parameters and random stream, and hands the new
text to the request's sink. A row whose sequence finishes, is cancelled or times out is free for the next
request at the next step, so a short answer never waits for a long one.

Everything that runs the model runs in the one loop thread; other threads (the web server's) talk to it
only through `submit`, `cancel` and `call`, which are thread-safe.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import OrderedDict, deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

import torch

from llmlab.engine.sampling import SamplingParams
from llmlab.engine.sequence import Sequence, TokenInfo, new_sequence, step
from llmlab.errors import LLMLabError

__all__ = ["ContinuousBatcher", "Request", "Sequence", "TokenInfo"]

log = logging.getLogger("llmlab.batcher")

VIEW_ROUNDING = 64  # each step attends over the cache only up to the longest busy row, rounded up to this
PREFIX_MIN_TOKENS = 16  # shorter shared prefixes are not worth a lookup (a chat template's own system prompt is
# longer: SmolLM2's 24 tokens are two thirds of a short question's prompt, and reusing them halves its prefill)
PREFIX_CACHE_ENTRIES = 4  # prefilled prompts kept for prefix reuse (a few MB each for a small model)


@dataclass
class Request:
    """What a client asked for. The sink receives events from the loop thread:
    ("delta", index, text, [TokenInfo]) as text becomes final, then ("finish", index, reason) per completion."""
    prompt_ids: list[int]
    params: SamplingParams
    sink: Callable[[tuple], None]
    n: int = 1
    constraint_factory: Callable[[], object] | None = None  # one llmlab.engine.constraint.Constraint per sample
    timeout: float | None = None  # seconds from submission
    id: int = 0
    submitted: float = 0.0
    cancelled: bool = False
    sequences: list[Sequence] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return bool(self.sequences) and all(s.finish_reason is not None for s in self.sequences)


class ContinuousBatcher:
    def __init__(self, engine, max_batch: int = 16, max_len: int | None = None, prefix_cache: bool = True):
        self.engine = engine
        self.model = engine.model
        self.tokenizer = engine.tokenizer
        self.max_batch = max_batch
        self.max_len = min(max_len or engine.context_len, engine.context_len)
        self.device = engine.device
        # fixed shape for the server's lifetime (what a compiled decode step needs)
        self.cache = self.model.new_cache(max_batch, self.max_len, lazy=True)  # (pages become resident as used)
        self.rows: list[Sequence | None] = [None] * max_batch
        self.logits: dict[int, torch.Tensor] = {}  # row -> next-token logits (1, V) not yet sampled from
        self.waiting: deque[Request] = deque()
        self.jobs: deque[tuple[Callable, Future]] = deque()
        self.prefixes: OrderedDict[tuple, tuple] = OrderedDict()  # prompt ids -> (its last logits, batch-1 cache)
        self.views: dict[tuple[int, int], object] = {}  # (rows, length) -> that view of self.cache
        self.use_prefix_cache = prefix_cache
        self.stats = {"steps": 0, "prefix_hits": 0, "prefix_tokens_reused": 0}
        self.outbox: list[tuple[Callable, tuple]] = []  # (sink, event) handed out just before the next decode step
        self._ids = itertools.count(1)
        self._wake = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    # ---- the thread-safe interface --------------------------------------------------------------------

    def start(self) -> "ContinuousBatcher":
        if self.engine.native_step is not None:  # the native steps run in the batcher's thread: free this one's
            from llmlab.engine.native import release_thread_pool  # OpenMP pool, or libgomp stops spinning (see there)
            release_thread_pool()
        self._thread = threading.Thread(target=self._run, name="llmlab-batcher", daemon=True)
        self._thread.start()
        return self

    def stop(self):
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def submit(self, request: Request) -> Request:
        """Queue a request; its events go to request.sink from the loop thread."""
        request.params.validate()
        if not request.prompt_ids:
            raise LLMLabError("prompt is empty")
        if request.n < 1 or request.n > self.max_batch:
            raise LLMLabError(f"n must be between 1 and {self.max_batch}, got {request.n}")
        if len(request.prompt_ids) >= self.max_len:
            raise LLMLabError(f"prompt is {len(request.prompt_ids)} tokens but the context length is "
                              f"{self.max_len} tokens, which leaves no room to generate")
        request.id = next(self._ids)
        request.submitted = time.monotonic()
        with self._wake:
            self.waiting.append(request)
            self._wake.notify()
        return request

    def cancel(self, request: Request):
        """Stop a request (a client went away); its rows are freed at the next step."""
        request.cancelled = True
        with self._wake:
            self._wake.notify()

    def call(self, fn: Callable, *args) -> Future:
        """Run fn(*args) in the loop thread between steps (e.g. scoring a prompt); returns a Future."""
        future = Future()
        with self._wake:
            self.jobs.append((lambda: fn(*args), future))
            self._wake.notify()
        return future

    @property
    def queue_depth(self) -> int:
        return len(self.waiting)

    @property
    def busy_rows(self) -> int:
        return sum(s is not None for s in self.rows)

    # ---- the loop ------------------------------------------------------------------------------------------

    def _run(self):
        while True:
            with self._wake:
                while not (self._stopping or self.waiting or self.jobs or self.busy_rows):
                    self._wake.wait()
                if self._stopping:
                    break
            try:
                self.step()
            except Exception as e:  # a bug must not leave clients waiting forever: fail what is running, go on
                log.exception("batcher step failed")
                for seq in [s for s in self.rows if s is not None]:
                    self._send(seq.request, ("error", repr(e)))
                    self._finish(seq, "error")
                self._deliver()
        for seq in [s for s in self.rows if s is not None]:
            self._finish(seq, "cancelled")
        self._deliver()

    def step(self):
        """One scheduling round: run jobs, drop cancelled work, admit, sample every busy row, decode."""
        while self.jobs:
            fn, future = self.jobs.popleft()
            try:
                future.set_result(fn())
            except Exception as e:
                future.set_exception(e)
        self._expire()
        self._admit()
        busy = [s for s in self.rows if s is not None]
        if busy:
            self._sample(busy)
            still = [s for s in busy if s.finish_reason is None]
            if still:
                self._decode(still)
            self.stats["steps"] += 1
        self._deliver()

    def _send(self, request: Request, event: tuple):
        self.outbox.append((request.sink, event))

    def _deliver(self):
        """Hand out the events of this round. _decode calls it just before the decode step: a server's event loop
        then streams them while the step runs outside the GIL, instead of taking the GIL between steps (measured
        at 1 client: 2 ms of every 9 ms step spent waiting for it)."""
        outbox, self.outbox = self.outbox, []
        for sink, event in outbox:
            sink(event)

    def _expire(self):
        now = time.monotonic()

        def reason(r: Request):
            if r.cancelled:
                return "cancelled"
            if r.timeout is not None and now - r.submitted > r.timeout:
                return "timeout"
            return None

        for req in [r for r in self.waiting if reason(r)]:
            self.waiting.remove(req)
            for i in range(req.n):
                self._send(req, ("finish", i, reason(req)))
        for seq in [s for s in self.rows if s is not None]:
            why = reason(seq.request)
            if why:
                self._finish(seq, why)

    def _admit(self):
        """Move waiting requests into free rows, first come first served (a request needs n rows at once).
        Requests admitted in the same round are prefilled together (see _prefill_all)."""
        free = [i for i, s in enumerate(self.rows) if s is None]  # lowest first: keeps the busy range short
        admitted = []
        while self.waiting and self.waiting[0].n <= len(free):
            req = self.waiting.popleft()
            admitted.append((req, free[:req.n]))
            free = free[req.n:]
        if not admitted:
            return
        prefilled = self._prefill_all([req.prompt_ids for req, _ in admitted])
        for (req, rows), (last, one) in zip(admitted, prefilled):
            limit = min(req.params.max_new_tokens, self.max_len - len(req.prompt_ids))
            for index, row in zip(range(req.n), rows):
                seq = new_sequence(self.tokenizer, req.params, req.prompt_ids, limit, index, req.constraint_factory,
                                   last.shape[-1], self.device)
                seq.request, seq.row = req, row
                req.sequences.append(seq)
                self.rows[row] = seq
                self.cache.copy_row(row, one, length=len(req.prompt_ids))
                self.logits[row] = last

    def _prefill_all(self, prompts: list[list[int]]) -> list[tuple]:
        """(logits after the prompt (1, V), its batch-1 cache) for each prompt.

        Prompts that share no prefix with a stored prompt or with each other run as one batch: a model with packed
        weights dequantizes every weight in each prefill call (a third to a half of a 40-token prompt's cost), so
        16 prompts arriving together pay that once instead of 16 times. The others then run one by one, so each
        finds its shared prefix cached (a long system prompt is prefilled once)."""
        together, alone = [], []
        for i, ids in enumerate(prompts):
            shares = self._cached_prefix(ids)[1] >= PREFIX_MIN_TOKENS or any(
                common_prefix_len(ids, prompts[j]) >= PREFIX_MIN_TOKENS for j in together)
            (alone if shares else together).append(i)
        native = self.engine.native_prefill is not None  # (its prefill reads the weights once per chunk anyway)
        if len(together) < 2 or self.model.config.n_experts or native:  # (expert capacity would couple batched prompts)
            alone, together = sorted(alone + together), []
        out = [None] * len(prompts)
        for i, result in zip(together, self._prefill_batch([prompts[i] for i in together])):
            out[i] = result
            self._remember(prompts[i], *result)
        for i in alone:
            out[i] = self._prefill(prompts[i])
        while len(self.prefixes) > PREFIX_CACHE_ENTRIES:  # (only now: every prompt of the round could find the others)
            self.prefixes.popitem(last=False)
        return out

    @torch.no_grad()
    def _prefill_batch(self, prompts: list[list[int]]) -> list[tuple]:
        """Several prompts in one forward pass, each left-padded to the longest. A prompt's tokens sit at positions
        0..len-1 and its pads at len..T-1 (slots no token of it attends to, rewritten by its decode steps), so every
        row's last column is its prompt's last token and attends to exactly that prompt."""
        if not prompts:
            return []
        T = max(len(ids) for ids in prompts)
        idx = torch.zeros(len(prompts), T, dtype=torch.long)
        pos = torch.zeros(len(prompts), T, dtype=torch.long)
        for r, ids in enumerate(prompts):
            pad = T - len(ids)
            idx[r, pad:] = torch.tensor(ids)
            pos[r, :pad] = torch.arange(len(ids), T)
            pos[r, pad:] = torch.arange(len(ids))
        cache = self.model.new_cache(len(prompts), T)
        last = self.model(idx.to(self.device), input_pos=pos.to(self.device), kv_cache=cache, last_only=True)
        last = last[:, -1].float()
        out = []
        for r, ids in enumerate(prompts):
            one = self.model.new_cache(1, len(ids))
            one.copy_row(0, cache, src_row=r, length=len(ids))
            out.append((last[r:r + 1].clone(), one))  # (a clone: a stored row must not hold the batch's)
        return out

    def _cached_prefix(self, ids: list[int]) -> tuple:
        """(the stored prompt sharing the longest prefix with ids, that length), or (None, 0)."""
        best, best_len = None, 0
        if self.use_prefix_cache:
            for key in self.prefixes:
                n = common_prefix_len(key, ids)
                if n > best_len:
                    best, best_len = key, n
        return best, best_len

    def _remember(self, ids: list[int], last: torch.Tensor, cache):
        if self.use_prefix_cache and len(ids) >= PREFIX_MIN_TOKENS:
            self.prefixes[tuple(ids)] = (last, cache)

    @torch.no_grad()
    def _prefill(self, ids: list[int]):
        """(logits after the prompt (1, V), its batch-1 cache). Reuses a stored prompt's
        cache for a shared prefix (a long system prompt), running the model only on the rest; the same prompt
        again (a retry, another client's identical request) runs nothing and gives exactly the same logits."""
        best, best_len = self._cached_prefix(ids)
        if best == tuple(ids):
            self.prefixes.move_to_end(best)
            self.stats["prefix_hits"] += 1
            self.stats["prefix_tokens_reused"] += len(ids)
            return self.prefixes[best]  # (read only: rows copy from it)
        best_len = min(best_len, len(ids) - 1)  # the last prompt token must run to give the next logits
        if best_len >= PREFIX_MIN_TOKENS:
            self.prefixes.move_to_end(best)
            one = self.model.new_cache(1, len(ids))
            one.copy_row(0, self.prefixes[best][1], length=best_len)
            last, _ = self.engine.prefill(ids[best_len:], cache=one, start=best_len)
            self.stats["prefix_hits"] += 1
            self.stats["prefix_tokens_reused"] += best_len
        else:
            last, one = self.engine.prefill(ids)
        self._remember(ids, last, one)
        return last, one

    def _sample(self, seqs: list[Sequence]):
        """Choose each row's next token from its pending logits (the step shared with Engine) and hand out any
        text that became final."""
        step(seqs, [self.logits.pop(seq.row) for seq in seqs])
        for seq in seqs:
            if seq.finish_reason is not None:
                self._finish(seq, seq.finish_reason)
                continue
            delta = seq.text.take()
            if delta:
                self._send(seq.request, ("delta", seq.index, delta, seq.unsent))
                seq.unsent = []

    def _finish(self, seq: Sequence, reason: str):
        """Hand out the rest of the text and the finish event, and free the row (once per sequence)."""
        if self.rows[seq.row] is not seq:
            return
        if seq.finish_reason is None:
            seq.finish(reason)
        delta = seq.text.take(final=True)
        if delta or seq.unsent:
            self._send(seq.request, ("delta", seq.index, delta, seq.unsent))
            seq.unsent = []
        self._send(seq.request, ("finish", seq.index, reason))
        self.rows[seq.row] = None
        self.logits.pop(seq.row, None)

    def _decode(self, seqs: list[Sequence]):
        """One decode step for the given rows. Only rows [0, highest busy row] run, and attention only spans
        the cache up to the longest row: both are views of the big cache, so nothing is copied."""
        n_rows = max(s.row for s in seqs) + 1
        tokens, pos = [0] * n_rows, [0] * n_rows  # idle rows feed token 0 and rewrite their slot 0
        for s in seqs:
            tokens[s.row], pos[s.row] = s.tokens[-1].id, s.pos
            s.pos += 1
        if self.engine.compiled_step is not None:  # compiled: always the full fixed shape
            view = self.cache
            tokens += [0] * (self.max_batch - n_rows)
            pos += [0] * (self.max_batch - n_rows)
        else:
            length = min(self.max_len, -(-(max(pos) + 1) // VIEW_ROUNDING) * VIEW_ROUNDING)
            view = self.views.get((n_rows, length))
            if view is None:  # few shapes over a server's life: each view is made once
                view = self.views[n_rows, length] = cache_view(self.cache, n_rows, length)
        tokens = torch.tensor(tokens, dtype=torch.long, device=self.device)[:, None]
        pos = torch.tensor(pos, dtype=torch.long, device=self.device)[:, None]
        self._deliver()
        logits = self.engine.decode_step(tokens, pos, view)
        for s in seqs:
            self.logits[s.row] = logits[s.row:s.row + 1]


def cache_view(cache, rows: int, length: int):
    """The first `rows` rows and `length` slots of a KVCache, as a KVCache sharing its memory."""
    view = object.__new__(type(cache))
    view.max_len = length
    view.k = [t[:rows, :, :length] for t in cache.k]
    view.v = [t[:rows, :, :length] for t in cache.v]
    view.k_far = [t[:rows, :, :length] for t in cache.k_far]
    return view


def common_prefix_len(a, b) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
