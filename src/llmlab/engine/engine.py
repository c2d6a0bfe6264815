"""Inference on a Transformer: batched sampling with a KV cache, streaming, beam search and scoring.

Every model call goes through two methods, prefill() and decode_step(), so a compiled decode step or a
continuous-batching scheduler can replace them without touching the rest.

Ragged batches need no padding: each prompt is prefilled on its own into a batch-1 cache and copied into
its row of the batch cache; then all rows decode together, each at its own position.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.nn.functional as F

from llmlab.engine.detokenize import IncrementalText
from llmlab.engine.sampling import SamplingParams, new_generator, sample_next
from llmlab.errors import LLMLabError

CACHE_ROUNDING = 64  # eager: cache lengths are rounded up to this
COMPILED_MIN_CACHE = 512  # compiled: cache lengths are powers of two from this, so few shapes get compiled


@dataclass
class Completion:
    token_ids: list[int]  # generated tokens, without the stop token that ended generation
    text: str  # their text, cut before a stop string
    finish_reason: str  # "stop" (stop token or stop string) | "length" (max_new_tokens or context full)
    logprobs: list[float] | None = None  # per token of token_ids, under the raw model distribution
    top_logprobs: list[dict[int, float]] | None = None  # per token: {token id: logprob}, most likely first
    prompt_tokens: int = 0
    completion_tokens: int = 0  # tokens sampled, counting a stop token
    score: float | None = None  # beam search: sum of logprobs / length ** length_penalty


@dataclass
class _Row:
    """One sequence being generated."""
    prompt_len: int
    limit: int  # most tokens it may sample
    text: IncrementalText
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[dict[int, float]] = field(default_factory=list)
    sampled: int = 0
    finish_reason: str | None = None

    def finish(self, reason: str):
        self.finish_reason = reason
        self.text.close()

    def completion(self, params: SamplingParams) -> Completion:
        return Completion(
            token_ids=self.token_ids, text=self.text.text, finish_reason=self.finish_reason,
            logprobs=self.logprobs if params.logprobs else None,
            top_logprobs=self.top_logprobs if params.logprobs and params.top_logprobs else None,
            prompt_tokens=self.prompt_len, completion_tokens=self.sampled,
        )


class Engine:
    def __init__(self, model, tokenizer, compile: bool = False):
        self.model = model
        self.tokenizer = tokenizer
        self.context_len = model.config.max_seq_len
        self.device = model.model.embed_tokens.weight.device
        self.compiled_step = compile_decode_step(model) if compile else None

    # ---- the only two places the model runs while generating ---------------------------------------------

    @torch.no_grad()
    def prefill(self, ids: list[int], max_len: int | None = None):
        """Run a whole prompt; return the logits after its last token (1, V) and a batch-1 cache holding it."""
        cache = self.model.new_cache(1, max_len or len(ids))
        idx = torch.tensor([ids], dtype=torch.long, device=self.device)
        logits = self.model(idx, input_pos=torch.arange(len(ids), device=self.device)[None],
                            kv_cache=cache, last_only=True)
        return logits[:, -1].float(), cache

    @torch.no_grad()
    def decode_step(self, tokens: torch.Tensor, input_pos: torch.Tensor, cache) -> torch.Tensor:
        """Feed one token per row (B, 1) at its position (B, 1); return the next-token logits (B, V)."""
        if self.compiled_step is not None:
            return self.compiled_step(tokens, input_pos, cache)
        return self.model(tokens, input_pos=input_pos, kv_cache=cache)[:, -1].float()

    # ---- sampling -----------------------------------------------------------------------------------

    def generate(self, prompts: list[list[int]], params: SamplingParams | None = None) -> list[Completion]:
        """Complete several prompts of any lengths together."""
        params = params or SamplingParams()
        rows = None
        for rows in self._steps(prompts, params):
            pass
        return [row.completion(params) for row in rows]

    def stream(self, prompt: list[int], params: SamplingParams | None = None) -> Iterator[str]:
        """Text of one completion, piece by piece as it is produced; the pieces join to generate()'s text."""
        params = params or SamplingParams()
        for (row,) in self._steps([prompt], params):
            delta = row.text.take(final=row.finish_reason is not None)
            if delta:
                yield delta

    def _steps(self, prompts: list[list[int]], params: SamplingParams) -> Iterator[list[_Row]]:
        """The generation loop: yields the rows after every sampled token, until all have finished."""
        params.validate(self.context_len)
        if not prompts:
            raise LLMLabError("no prompts to complete")
        for p in prompts:
            self._check_prompt(p)
        stop_ids = set() if params.ignore_eos else set(
            self.tokenizer.stop_token_ids if params.stop_token_ids is None else params.stop_token_ids)
        stop_strings = [params.stop] if isinstance(params.stop, str) else list(params.stop)
        rows = [_Row(prompt_len=len(p), limit=min(params.max_new_tokens, self.context_len - len(p)),
                     text=IncrementalText(self.tokenizer, stop_strings)) for p in prompts]

        # prefill each prompt alone (exact length, no padding) and copy it into its row of the batch cache
        B = len(prompts)
        cache = self.model.new_cache(B, self._cache_len(max(r.prompt_len + r.limit for r in rows)))
        logits = []
        for i, p in enumerate(prompts):
            last, one = self.prefill(p)
            cache.copy_row(i, one, length=len(p))
            logits.append(last)
        logits = torch.cat(logits)
        pos = torch.tensor([[len(p)] for p in prompts], device=self.device)  # where each row's next token goes

        generator = new_generator(params.seed, self.device)
        seen = None
        if params.repetition_penalty != 1.0:
            seen = torch.zeros(B, logits.shape[-1], dtype=torch.bool, device=self.device)
            for i, p in enumerate(prompts):
                seen[i, torch.tensor(p, device=self.device)] = True

        while True:
            next_ids = sample_next(logits, params, generator, seen)
            if seen is not None:
                seen[torch.arange(B), next_ids] = True
            if params.logprobs:
                logp = F.log_softmax(logits, dim=-1)
                chosen = logp.gather(-1, next_ids[:, None])[:, 0].tolist()
                if params.top_logprobs:
                    top = logp.topk(min(params.top_logprobs, logp.shape[-1]), dim=-1)
                    top_ids, top_vals = top.indices.tolist(), top.values.tolist()
            for i, (row, token) in enumerate(zip(rows, next_ids.tolist())):
                if row.finish_reason is not None:
                    continue  # finished rows are still computed (cheaper than reshaping the batch) but ignored
                row.sampled += 1
                if token in stop_ids:
                    row.finish("stop")
                    continue
                row.token_ids.append(token)
                if params.logprobs:
                    row.logprobs.append(chosen[i])
                    if params.top_logprobs:
                        row.top_logprobs.append(dict(zip(top_ids[i], top_vals[i])))
                row.text.add(token)
                if row.text.stopped:
                    row.finish("stop")
                elif row.sampled >= row.limit:
                    row.finish("length")
            yield rows
            if all(row.finish_reason is not None for row in rows):
                return
            logits = self.decode_step(next_ids[:, None], pos, cache)
            active = torch.tensor([[row.finish_reason is None] for row in rows], device=self.device)
            pos = torch.where(active, pos + 1, pos)  # a finished row keeps rewriting one slot it no longer needs

    # ---- beam search --------------------------------------------------------------------------------

    @torch.no_grad()
    def beam_search(self, prompt: list[int], beam_width: int, max_new_tokens: int, length_penalty: float = 1.0,
                    stop_token_ids: set[int] | None = None) -> list[Completion]:
        """The beam_width best continuations, best first, scored by sum logprob / length ** length_penalty.

        A hypothesis that samples a stop token is finished and kept; the search ends when the best
        finished hypothesis scores higher than every live beam (Hugging Face's early_stopping=False
        heuristic), or after max_new_tokens (capped to the context window), when live beams finish as "length".
        """
        if beam_width < 1:
            raise LLMLabError(f"beam_width must be >= 1, got {beam_width}")
        if max_new_tokens <= 0:
            raise LLMLabError(f"max_new_tokens must be > 0, got {max_new_tokens}")
        self._check_prompt(prompt)
        stop_ids = set(self.tokenizer.stop_token_ids if stop_token_ids is None else stop_token_ids)
        max_new_tokens = min(max_new_tokens, self.context_len - len(prompt))

        def score(total: float, length: int) -> float:
            return total / length ** length_penalty

        last, cache = self.prefill(prompt, self._cache_len(len(prompt) + max_new_tokens))
        logp = F.log_softmax(last, dim=-1)  # (live beams, V); one live beam before the first step
        beams = [([], [])]  # per live beam: token ids, their logprobs
        totals = torch.zeros(1, device=self.device)
        finished = []  # (score, token ids, logprobs, finish_reason, tokens sampled)
        vocab = logp.shape[-1]
        for step in range(max_new_tokens):
            candidates = (totals[:, None] + logp).view(-1)
            # 2 * width candidates: even if half of them end in a stop token, width beams live on
            top = candidates.topk(min(2 * beam_width, candidates.numel()))
            new_beams, rows, tokens, new_totals = [], [], [], []
            for total, flat in zip(top.values.tolist(), top.indices.tolist()):
                row, token = divmod(flat, vocab)
                ids, lps = beams[row]
                token_lp = logp[row, token].item()
                if token in stop_ids:
                    finished.append((score(total, step + 1), ids, lps + [token_lp], "stop", step + 1))
                    continue
                new_beams.append((ids + [token], lps + [token_lp]))
                rows.append(row)
                tokens.append(token)
                new_totals.append(total)
                if len(new_beams) == beam_width:
                    break
            beams, totals = new_beams, torch.tensor(new_totals, device=self.device)
            if step == max_new_tokens - 1 or not beams:
                break
            best_live = max(score(t, step + 1) for t in new_totals)
            if finished and max(f[0] for f in finished) > best_live:
                break
            cache.reorder(torch.tensor(rows, device=self.device))  # each surviving beam takes its parent's cache
            tokens = torch.tensor(tokens, device=self.device)[:, None]
            pos = torch.full_like(tokens, len(prompt) + step)
            logp = F.log_softmax(self.decode_step(tokens, pos, cache), dim=-1)
        for (ids, lps), total in zip(beams, totals.tolist()):
            finished.append((score(total, len(ids)), ids, lps, "length", len(ids)))
        finished.sort(key=lambda f: f[0], reverse=True)
        return [Completion(token_ids=ids, text=self.tokenizer.decode(ids), finish_reason=reason,
                           logprobs=lps[:len(ids)], prompt_tokens=len(prompt), completion_tokens=n, score=s)
                for s, ids, lps, reason, n in finished[:beam_width]]

    # ---- scoring ------------------------------------------------------------------------------------

    def logprobs(self, prompt: list[int], continuation: list[int]) -> list[float]:
        """Log-probability of each continuation token after the prompt (one forward, no cache)."""
        return self.score_batch([(prompt, continuation)])[0]

    @torch.no_grad()
    def score_batch(self, pairs: list[tuple[list[int], list[int]]]) -> list[list[float]]:
        """logprobs() for many (prompt, continuation) pairs in one right-padded forward.

        Right padding is harmless: attention is causal, so real tokens never see the padding after them.
        """
        for prompt, continuation in pairs:
            if not prompt:
                raise LLMLabError("prompt is empty: the first continuation token needs a token before it")
            if len(prompt) + len(continuation) > self.context_len:
                raise LLMLabError(f"prompt + continuation is {len(prompt) + len(continuation)} tokens but the "
                                  f"model's context window is {self.context_len} tokens")
        if not pairs:
            return []
        seqs = [list(p) + list(c) for p, c in pairs]
        width = max(len(s) for s in seqs)
        idx = torch.zeros(len(seqs), width, dtype=torch.long, device=self.device)
        for i, s in enumerate(seqs):
            idx[i, :len(s)] = torch.tensor(s)
        logp = F.log_softmax(self.model(idx).float(), dim=-1)
        out = []
        for i, (prompt, continuation) in enumerate(pairs):
            n = len(prompt)
            # the logits at position t predict token t + 1
            targets = torch.tensor(continuation, dtype=torch.long, device=self.device)
            out.append(logp[i, n - 1:n - 1 + len(continuation)].gather(-1, targets[:, None])[:, 0].tolist())
        return out

    def prompt_logprobs(self, ids: list[int]) -> list[float | None]:
        """Log-probability of each prompt token given the ones before it; None for the first (the server's echo)."""
        if not ids:
            return []
        return [None] + self.logprobs(ids[:1], ids[1:])

    # ---- helpers ------------------------------------------------------------------------------------

    def _check_prompt(self, prompt: list[int]):
        if len(prompt) == 0:
            raise LLMLabError("prompt is empty: give at least one token (e.g. BOS)")
        if len(prompt) >= self.context_len:
            raise LLMLabError(f"prompt is {len(prompt)} tokens but the model's context window is "
                              f"{self.context_len} tokens, which leaves no room to generate")

    def _cache_len(self, needed: int) -> int:
        if self.compiled_step is not None:
            # every distinct cache length is a fresh compilation: use a few power-of-two sizes
            rounded = max(COMPILED_MIN_CACHE, 1 << (needed - 1).bit_length())
        else:
            rounded = -(-needed // CACHE_ROUNDING) * CACHE_ROUNDING
        return min(rounded, self.context_len)


def compile_decode_step(model):
    """The decode step through torch.compile: weights frozen into the graph, shapes static.

    At batch 1 decoding streams every weight once per token, so speed is memory bandwidth and per-op
    overhead. Compiled, the whole step becomes a few fused C++ kernels, and the linear layers become a
    fused multiply-and-sum (see llmlab.model.transformer.Linear). The first call for each (batch, cache
    length) compiles, about a minute on 2 cores; inductor caches the result on disk for later runs.
    """
    def step(tokens, input_pos, cache):
        return model(tokens, input_pos=input_pos, kv_cache=cache)[:, -1].float()

    return torch.compile(step, fullgraph=True, dynamic=False, options={"freezing": True})
