"""The model client for an llmlab model in this process: generation through the engine, scoring in batches."""

from __future__ import annotations

from typing import Iterator

from llmlab.client.base import GenParams, Generation, LogLik, chat_messages
from llmlab.errors import LLMLabError


class LocalClient:
    """An llmlab LLM (llmlab.load) behind the ModelClient protocol.

    torch and the engine are imported where they are used, not with this module: `from llmlab.client import ...`
    stays cheap for the CLI and for programs that only talk to an endpoint.

    Scoring groups pairs that share a context (the choices of one question): the context runs once into a KV
    cache and every continuation is scored from there; contexts of several questions run in one padded batch.
    """

    def __init__(self, llm, batch_tokens: int = 4096, max_batch: int = 32, gen_batch: int = 8):
        self.llm, self.name = llm, str(getattr(llm, "path", "local"))
        self.batch_tokens, self.max_batch, self.gen_batch = batch_tokens, max_batch, gen_batch
        tok = llm.tokenizer
        # a context-free continuation (perplexity) is scored after a document separator, as lm-eval does
        self.prefix_id = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        self._tool_vocab = None  # chat_tools' token vocabulary for the grammar, built on first use

    @property
    def model_id(self) -> str:
        """Which model answers: its checkpoint path (what a resumed eval must match)."""
        return self.name

    @property
    def context_len(self) -> int:
        return self.llm.engine.context_len

    # ---- generation ------------------------------------------------------------------------------------------

    def _sampling(self, params: GenParams):
        params.validate()
        return self.llm.params(max_new_tokens=params.max_tokens, stop=list(params.stop), seed=params.seed,
                               logprobs=params.logprobs or params.top_logprobs > 0,
                               top_logprobs=params.top_logprobs, **params.sampling_options())

    def _prompt_ids(self, prompt, chat: bool) -> list[int]:
        # never cut: a prompt that does not fit is refused by the engine (as an endpoint answers 400), and the
        # completion budget is capped to the room the prompt leaves
        return self.llm.prompt_ids(prompt, raw=not chat)

    def complete(self, prompts: list, params: GenParams, chat: bool = True) -> list[list[Generation]]:
        sp = self._sampling(params)
        out = []
        per_call = max(1, self.gen_batch // params.n)  # rows per engine call: prompts × samples
        for start in range(0, len(prompts), per_call):
            # batch use (eval, judge) keeps the end of a prompt too long for the window, as lm-eval does
            room = max(1, self.context_len - params.max_tokens)
            chunk = [self._prompt_ids(p, chat)[-room:] for p in prompts[start:start + per_call]]
            done = self.llm.engine.generate(chunk, sp, n=params.n)
            for i in range(len(chunk)):
                out.append([self._generation(c) for c in done[i * params.n:(i + 1) * params.n]])
        return out

    def generate(self, prompts: list, params: GenParams, chat: bool = True) -> list[Generation]:
        return [samples[0] for samples in self.complete(prompts, params, chat)]

    def stream(self, prompt, params: GenParams, chat: bool = True) -> Iterator[str]:
        if params.n != 1:
            raise LLMLabError("streaming gives one generation: n must be 1")
        ids = self._prompt_ids(prompt, chat)
        return self.llm.engine.stream(ids, self._sampling(params))

    def chat_tools(self, messages: list[dict], tools: list[dict], params: GenParams, tool_choice="auto",
                   parallel_tool_calls: bool = True) -> Generation:
        """One answer that may call tools, decoded as llmlab serve decodes it: the same prompt format and the same
        grammar (engine/tools.py), so a call's name is one of the tools and its arguments validate."""
        from llmlab.engine.constraint import TokenVocab
        from llmlab.engine.tools import (check_tools, choose_tools, parse_tool_calls, render_messages,
                                         tool_constraint_factory, tool_grammar)
        if params.n != 1:
            raise LLMLabError("chat_tools gives one answer: n must be 1")
        mode, callable_tools = choose_tools(check_tools(tools), tool_choice)
        ids = self.llm.prompt_ids(render_messages(messages, callable_tools))
        grammar = tool_grammar(mode, callable_tools, parallel_tool_calls)
        factory = None
        if grammar is not None:
            if self._tool_vocab is None:
                self._tool_vocab = TokenVocab(self.llm.tokenizer)  # built once (about a second)
            # the engine caps the completion to the room the prompt leaves: the closer must plan for that budget
            budget = min(params.max_tokens, self.context_len - len(ids))
            factory = tool_constraint_factory(self._tool_vocab, grammar, max(budget, 1))
        done = self.llm.engine.generate([ids], self._sampling(params), constraint_factory=factory)[0]
        g = self._generation(done)
        g.tool_calls = []
        if grammar is not None:
            content, calls = parse_tool_calls(done.text)
            g.text, g.tool_calls = content or "", calls
            if calls and g.finish_reason == "stop":
                g.finish_reason = "tool_calls"
        return g

    def _generation(self, c) -> Generation:
        g = Generation(c.text, c.finish_reason, c.prompt_tokens, c.completion_tokens)
        if c.logprobs is not None:
            dec = self.llm.tokenizer.decode
            g.tokens = [dec([t]) for t in c.token_ids]
            g.logprobs = list(c.logprobs)
            if c.top_logprobs is not None:
                g.top_logprobs = [{dec([t]): lp for t, lp in step.items()} for step in c.top_logprobs]
        return g

    # ---- text facts --------------------------------------------------------------------------------------------

    def count_tokens(self, text: str) -> int:
        return len(self.llm.tokenizer.encode(text))

    def chat_text(self, prompt) -> str:
        tok = self.llm.tokenizer
        if isinstance(prompt, str) and not tok.chat_template:
            return prompt  # what LLM.prompt_ids generates from, too
        return tok.apply_chat_template(chat_messages(prompt), add_generation_prompt=True)

    # ---- scoring ---------------------------------------------------------------------------------------------

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        tok = self.llm.tokenizer
        # trailing spaces belong to the continuation: "Answer: " + "Paris" tokenizes as "Answer:" + " Paris"
        stripped = context.rstrip(" ")
        continuation = context[len(stripped):] + continuation
        ctx = tok.encode(stripped, add_special_tokens=True) if stripped else []
        if not ctx:
            ctx = [self._prefix()]
        return ctx, tok.encode(continuation)

    def _prefix(self) -> int:
        if self.prefix_id is None:
            raise LLMLabError("this tokenizer has no BOS or EOS token to score a text without context after")
        return self.prefix_id

    def loglikelihood(self, pairs: list[tuple[str, str]]) -> list[LogLik]:
        encoded = [self._encode_pair(c, x) for c, x in pairs]
        for ctx, cont in encoded:
            if not cont:
                raise LLMLabError("a continuation to score is empty")
            if len(cont) >= self.context_len:
                raise LLMLabError(f"a continuation of {len(cont)} tokens does not fit the model's context window "
                                  f"of {self.context_len}: score long texts with loglikelihood_rolling")
        window = self.context_len  # keep the most recent context when a pair does not fit
        return self.score_tokens([(ctx[max(0, len(ctx) + len(cont) - window):], cont) for ctx, cont in encoded])

    def loglikelihood_rolling(self, texts: list[str], stride: int | None = None) -> list[LogLik]:
        """Strided sliding windows (as lm-eval's rolling log-likelihood): each window of up to the context
        length scores the `stride` tokens after the ones already scored, with the tokens before them as context,
        so every token is scored once and with at least context − stride tokens before it (all it can see)."""
        window = self.context_len
        stride = stride or window // 2
        jobs, owner = [], []
        for i, text in enumerate(texts):
            ids = [self._prefix()] + self.llm.tokenizer.encode(text)
            if len(ids) < 2:
                raise LLMLabError("a text to score is empty")
            for start in range(1, len(ids), stride):
                end = min(start + stride, len(ids))
                jobs.append((ids[max(0, end - window):start], ids[start:end]))
                owner.append(i)
        out = [LogLik(0.0, 0, True) for _ in texts]
        for i, ll in zip(owner, self.score_tokens(jobs)):
            out[i] = LogLik(out[i].logprob + ll.logprob, out[i].n_tokens + ll.n_tokens, out[i].greedy and ll.greedy)
        return out

    def score_tokens(self, encoded: list[tuple[list[int], list[int]]]) -> list[LogLik]:
        """log P(continuation | context) for token-id pairs that fit the window, batched by shared context."""
        import torch
        groups: dict[tuple, list[int]] = {}
        for i, (ctx, _) in enumerate(encoded):
            groups.setdefault(tuple(ctx), []).append(i)
        jobs = []  # (context, pair indices), at most max_batch continuations each
        for ctx, members in groups.items():
            for start in range(0, len(members), self.max_batch):
                jobs.append((list(ctx), members[start:start + self.max_batch]))
        jobs.sort(key=lambda j: -len(j[0]))  # similar lengths together: little padding
        out: list[LogLik | None] = [None] * len(encoded)
        with torch.inference_mode():
            for batch in self._batches(jobs, encoded):
                for job, scores in zip(batch, self._score_jobs(batch, encoded)):
                    for i, score in zip(job[1], scores):
                        out[i] = score
        return out

    def _batches(self, jobs, encoded):
        """Consecutive jobs grouped while the padded batch stays within max_batch rows and batch_tokens."""
        batch, rows, width = [], 0, 0
        for job in jobs:
            new_rows = rows + len(job[1])
            new_width = max(width, len(job[0]) + max(len(encoded[i][1]) for i in job[1]))
            if batch and (new_rows > self.max_batch or new_rows * new_width > self.batch_tokens):
                yield batch
                batch, new_rows = [], len(job[1])
                new_width = len(job[0]) + max(len(encoded[i][1]) for i in job[1])
            batch.append(job)
            rows, width = new_rows, new_width
        if batch:
            yield batch

    def _score_jobs(self, jobs, encoded) -> list[list[LogLik]]:
        """One padded forward over the contexts (all but their last token, into a KV cache), then one over
        every continuation prefixed by its context's last token, from a copy of its context's cache row.

        Padding is harmless: a row's padding lands in cache slots after its real tokens, and each
        continuation overwrites those slots before attending to them (a query sees only slots <= its position).
        """
        import torch

        from llmlab.engine.scoring import token_logprobs
        engine = self.llm.engine
        dev = engine.device
        ctx_len = [len(ctx) for ctx, _ in jobs]
        conts = [[encoded[i][1] for i in members] for _, members in jobs]
        longest = max(len(c) for cs in conts for c in cs)
        T = max(ctx_len) - 1
        cache = engine.model.new_cache(len(jobs), T + 1 + longest)
        if T > 0:
            idx = torch.zeros(len(jobs), T, dtype=torch.long, device=dev)
            for r, (ctx, _) in enumerate(jobs):
                idx[r, :len(ctx) - 1] = torch.tensor(ctx[:-1])
            pos = torch.arange(T, device=dev)[None].expand(len(jobs), -1)
            engine.model(idx, input_pos=pos, kv_cache=cache, last_only=True)
        owner = [r for r, cs in enumerate(conts) for _ in cs]
        cache.reorder(torch.tensor(owner, device=dev))
        idx = torch.zeros(len(owner), 1 + longest, dtype=torch.long, device=dev)
        pos = torch.zeros(len(owner), 1 + longest, dtype=torch.long, device=dev)
        flat = [(r, c) for r, cs in enumerate(conts) for c in cs]
        for row, (r, c) in enumerate(flat):
            idx[row, :1 + len(c)] = torch.tensor([jobs[r][0][-1]] + c)
            pos[row] = ctx_len[r] - 1 + torch.arange(1 + longest, device=dev)
        logits = engine.model(idx, input_pos=pos, kv_cache=cache)
        out = [[] for _ in jobs]
        for row, (r, c) in enumerate(flat):
            step_logits = logits[row, :len(c)]  # position t predicts token t + 1
            targets = torch.tensor(c, device=dev)
            lp = token_logprobs(step_logits, targets)
            greedy = bool((step_logits.argmax(-1) == targets).all())
            out[r].append(LogLik(float(lp.sum()), len(c), greedy))
        return out
