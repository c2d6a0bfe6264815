"""`llmlab serve --speculate`: requests with n=1 and no constraint are decoded speculatively, one verify step at a
time in the batcher's own thread, so they take turns with the batch's decode steps and never run beside them.

Each verify step is a job for `ContinuousBatcher.call` (run between two batch steps); the request's events go to
its sink in the batcher's format (("delta", 0, text, [TokenInfo]) then ("finish", 0, reason)), so the routes
stream, wait, cancel and count it exactly as a batched request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Callable

from llmlab.engine.sampling import SamplingParams
from llmlab.engine.sequence import Sequence
from llmlab.engine.speculative import SpeculativeDecoder, SpeculativeStats

log = logging.getLogger("llmlab.serve")


@dataclass
class SpeculativeRequest:
    """What the routes see of a batched Request (n, sequences, done, cancelled), plus the drafts' stats."""
    prompt_ids: list[int]
    params: SamplingParams
    sink: Callable[[tuple], None]
    timeout: float | None = None
    n: int = 1
    submitted: float = field(default_factory=time.monotonic)
    cancelled: bool = False
    sequences: list[Sequence] = field(default_factory=list)
    stats: SpeculativeStats = field(default_factory=SpeculativeStats)
    task: asyncio.Task | None = None  # the coroutine driving it (held here: the event loop keeps only weak references)

    @property
    def done(self) -> bool:
        return bool(self.sequences) and all(s.finish_reason is not None for s in self.sequences)


def can_speculate(n: int, constraint_factory, params: SamplingParams) -> bool:
    """Which requests the speculative path runs: one completion of free text (a constraint's mask or a logits
    processor decides token by token and cannot verify a draft ahead of it); the others go to the continuous
    batcher as before, and their usage carries no speculative fields."""
    return n == 1 and constraint_factory is None and not params.logits_processors


def submit_speculative(batcher, decoder: SpeculativeDecoder, metrics, req: SpeculativeRequest) -> SpeculativeRequest:
    """Start decoding req; call from the event loop (it drives the steps through batcher.call)."""
    req.params.validate(decoder.engine.context_len)
    req.task = asyncio.ensure_future(drive(batcher, decoder, metrics, req))
    return req


async def drive(batcher, decoder: SpeculativeDecoder, metrics, req: SpeculativeRequest):
    steps = decoder.steps(req.prompt_ids, req.params, req.stats)
    try:
        while not await asyncio.wrap_future(batcher.call(advance, steps, req, metrics)):
            pass
    except Exception as e:  # as the batcher: a bug must not leave the client waiting forever
        log.exception("speculative step failed")
        for seq in req.sequences:
            if seq.finish_reason is None:
                seq.finish("error")
        req.sink(("error", repr(e)))
        req.sink(("finish", 0, "error"))
    finally:
        steps.close()


def advance(steps, req: SpeculativeRequest, metrics) -> bool:
    """One verify step in the batcher's thread, or the end of the request; True when it has finished."""
    seq = req.sequences[0] if req.sequences else None
    why = "cancelled" if req.cancelled else (
        "timeout" if req.timeout is not None and time.monotonic() - req.submitted > req.timeout else None)
    if why is None:
        seq = next(steps)
        if not req.sequences:
            req.sequences.append(seq)
    elif seq is not None:
        seq.finish(why)
    final = seq is None or seq.finish_reason is not None
    delta = seq.text.take(final=final) if seq is not None else ""
    if delta or (final and seq is not None and seq.unsent):
        req.sink(("delta", 0, delta, seq.unsent))
        seq.unsent = []
    if final:  # counted before the client hears of the end, so /metrics already shows this request
        metrics.count_speculative(req.stats)
        req.sink(("finish", 0, why or seq.finish_reason))
    return final
