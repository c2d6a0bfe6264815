"""Inference on a Transformer: batched sampling with a KV cache, n samples per prompt, streaming, beams, scoring.

Every model call goes through two methods, prefill() and decode_step(), so a compiled decode step or a
continuous-batching scheduler can replace them without touching the rest.

Ragged batches need no padding: each prompt is prefilled on its own into a batch-1 cache and copied into
its row of the batch cache; then all rows decode together, each at its own position.
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch

from llmlab.engine.beam import beam_search
from llmlab.engine.sampling import SamplingParams
from llmlab.engine.scoring import token_logprobs
from llmlab.engine.sequence import Completion, Sequence, new_sequence, step
from llmlab.errors import LLMLabError

CACHE_ROUNDING = 64  # eager: cache lengths are rounded up to this
COMPILED_MIN_CACHE = 512  # compiled: cache lengths are powers of two from this, so few shapes get compiled


class Engine:
    def __init__(self, model, tokenizer, compile: bool = False, native_step: Callable | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.context_len = model.config.max_seq_len
        self.device = model.model.norm.weight.device  # (the embedding may be packed: llmlab.engine.native)
        self.compiled_step = compile_decode_step(model) if compile else None
        # a whole decode step outside PyTorch (llmlab.engine.native.NativeDecoder), same arguments and cache
        self.native_step = native_step
        self.native_prefill = getattr(native_step, "prefill", None)  # its chunked prompt path, where it has one

    # ---- the only two places the model runs while generating ---------------------------------------------

    @torch.no_grad()
    def prefill(self, ids: list[int], max_len: int | None = None, cache=None, start: int = 0):
        """Run a prompt; return the logits after its last token (1, V) and the batch-1 cache holding it. With
        `cache` (holding the prompt's first `start` tokens, e.g. a cached system prompt), ids are the rest.

        With the native step the prompt runs through it too, in chunks (NativeDecoder.prefill: its last 64 tokens
        with bf16 activations where the CPU has AVX512-BF16, the ones before with the decode steps' int8 ones); else
        one PyTorch forward."""
        if cache is None:
            cache = self.model.new_cache(1, max_len or start + len(ids))
        if self.native_prefill is not None:
            return self.native_prefill(ids, start, cache), cache
        idx = torch.tensor([ids], dtype=torch.long, device=self.device)
        logits = self.model(idx, input_pos=torch.arange(start, start + len(ids), device=self.device)[None],
                            kv_cache=cache, last_only=True)
        return logits[:, -1].float(), cache

    @torch.no_grad()
    def decode_step(self, tokens: torch.Tensor, input_pos: torch.Tensor, cache) -> torch.Tensor:
        """Feed one token per row (B, 1) at its position (B, 1); return the next-token logits (B, V)."""
        if self.native_step is not None:
            return self.native_step(tokens, input_pos, cache)
        if self.compiled_step is not None:
            return self.compiled_step(tokens, input_pos, cache)
        return self.model(tokens, input_pos=input_pos, kv_cache=cache)[:, -1].float()

    # ---- sampling -----------------------------------------------------------------------------------

    def generate(self, prompts: list[list[int]], params: SamplingParams | None = None, n: int = 1,
                 constraint_factory: Callable | None = None) -> list[Completion]:
        """Complete several prompts of any lengths together, n samples each (prompt 0's n, then prompt 1's...).

        Each prompt is prefilled once and its cache row copied into its n rows. Sample i of every prompt draws
        from its own random stream seeded seed + i, so batching prompts together changes no prompt's samples,
        and the server's request with the same seed gives the same ones. constraint_factory() makes one
        constraint per sample (llmlab.engine.constraint.json_constraint_factory).
        """
        params = params or SamplingParams()
        seqs = None
        for seqs in self._steps(prompts, params, n, constraint_factory):
            pass
        return [seq.completion() for seq in seqs]

    def stream(self, prompt: list[int], params: SamplingParams | None = None,
               constraint_factory: Callable | None = None) -> Iterator[str]:
        """Text of one completion, piece by piece as it is produced; the pieces join to generate()'s text."""
        params = params or SamplingParams()
        for (seq,) in self._steps([prompt], params, 1, constraint_factory):
            delta = seq.text.take(final=seq.finish_reason is not None)
            if delta:
                yield delta

    def _steps(self, prompts: list[list[int]], params: SamplingParams, n: int = 1,
               constraint_factory: Callable | None = None) -> Iterator[list[Sequence]]:
        """The generation loop: yields the sequences after every sampled token, until all have finished."""
        params.validate(self.context_len)
        if not prompts:
            raise LLMLabError("no prompts to complete")
        if n < 1:
            raise LLMLabError(f"n must be >= 1, got {n}")
        for p in prompts:
            self._check_prompt(p)
        vocab = self.model.config.vocab_size
        seqs = [new_sequence(self.tokenizer, params, p, min(params.max_new_tokens, self.context_len - len(p)), i,
                             constraint_factory, vocab, self.device) for p in prompts for i in range(n)]

        # prefill each prompt alone (exact length, no padding), once, and copy it into its n rows of the batch cache
        B = len(seqs)
        cache = self.model.new_cache(B, self._cache_len(max(s.prompt_len + s.limit for s in seqs)))
        logits = []
        for j, p in enumerate(prompts):
            if B == 1:  # straight into the batch cache: no second cache of the prompt alive while decoding
                last, _ = self.prefill(p, cache=cache)
            else:
                last, one = self.prefill(p)
                for row in range(j * n, (j + 1) * n):
                    cache.copy_row(row, one, length=len(p))
                del one
            logits.append(last.expand(n, -1))
        logits = torch.cat(logits)
        pos = torch.tensor([[s.prompt_len] for s in seqs], device=self.device)  # where each row's next token goes
        tokens = [0] * B
        while True:
            live = [i for i, s in enumerate(seqs) if s.finish_reason is None]
            rows = logits.split(1)
            for i, token in zip(live, step([seqs[i] for i in live], [rows[i] for i in live])):
                tokens[i] = token  # finished rows keep feeding their last token (cheaper than reshaping the batch)
            yield seqs
            if all(s.finish_reason is not None for s in seqs):
                return
            logits = self.decode_step(torch.tensor(tokens, device=self.device)[:, None], pos, cache)
            active = torch.tensor([[s.finish_reason is None] for s in seqs], device=self.device)
            pos = torch.where(active, pos + 1, pos)  # a finished row keeps rewriting one slot it no longer needs

    # ---- beam search --------------------------------------------------------------------------------

    def beam_search(self, prompt: list[int], beam_width: int, params: SamplingParams | None = None,
                    length_penalty: float = 1.0) -> list[Completion]:
        """The beam_width best continuations, best first (see llmlab.engine.beam: which options it honours)."""
        return beam_search(self, prompt, beam_width, params, length_penalty)

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
        logits = self.model(idx)
        out = []
        for i, (prompt, continuation) in enumerate(pairs):
            n = len(prompt)
            # the logits at position t predict token t + 1
            targets = torch.tensor(continuation, dtype=torch.long, device=self.device)
            out.append(token_logprobs(logits[i, n - 1:n - 1 + len(continuation)], targets).tolist())
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
