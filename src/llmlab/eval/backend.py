"""Where evaluated models live: a Backend scores and generates text, in-process (LocalBackend) or over HTTP
from any OpenAI-compatible endpoint (OpenAIBackend). Everything else in llmlab.eval talks only to this protocol."""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

from llmlab.errors import LLMLabError


@dataclass
class LogLik:
    logprob: float  # sum over the continuation's tokens
    n_tokens: int
    greedy: bool = False  # every continuation token was the most likely one (local backend only)


@dataclass
class Generation:
    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    # per generated token: {token text: logprob}, most likely first (when asked for top_logprobs)
    top_logprobs: list[dict[str, float]] | None = None
    tokens: list[str] | None = None  # the generated tokens' texts (when asked for top_logprobs)


@dataclass
class GenParams:
    max_tokens: int = 128
    temperature: float = 0.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    top_logprobs: int = 0  # > 0: return the n most likely tokens at each step


class Backend(Protocol):
    name: str

    def loglikelihood(self, pairs: list[tuple[str, str]]) -> list[LogLik]:
        """log P(continuation | context) for each (context, continuation) of raw text."""

    def generate(self, prompts: list, params: GenParams, chat: bool = True) -> list[Generation]:
        """Completions of several prompts: chat (a user message or a list of messages) or raw text."""

    def count_tokens(self, text: str) -> int:
        """Tokens in `text` (exact for local, an estimate for endpoints)."""

    def chat_text(self, prompt) -> str | None:
        """The raw text a chat prompt is rendered to before generating (chat template, generation prompt
        included), so a transcript can be continued and scored with loglikelihood; None when it is unknown."""


# ---- in-process --------------------------------------------------------------------------------------------


class LocalBackend:
    """An llmlab model in this process. Scoring batches pairs of similar length into one forward each."""

    def __init__(self, llm, batch_tokens: int = 4096, max_batch: int = 32, gen_batch: int = 8):
        self.llm, self.name = llm, str(getattr(llm, "path", "local"))
        self.batch_tokens, self.max_batch, self.gen_batch = batch_tokens, max_batch, gen_batch
        tok = llm.tokenizer
        # a context-free continuation (perplexity) is scored after a document separator, as lm-eval does
        self.prefix_id = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id

    def count_tokens(self, text: str) -> int:
        return len(self.llm.tokenizer.encode(text))

    def chat_text(self, prompt) -> str:
        tok = self.llm.tokenizer
        if isinstance(prompt, str) and not tok.chat_template:
            return prompt  # what LLM.prompt_ids generates from, too
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        return tok.apply_chat_template(messages, add_generation_prompt=True)

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        tok = self.llm.tokenizer
        # trailing spaces belong to the continuation: "Answer: " + "Paris" tokenizes as "Answer:" + " Paris"
        stripped = context.rstrip(" ")
        continuation = context[len(stripped):] + continuation
        ctx = tok.encode(stripped, add_special_tokens=True) if stripped else []
        if not ctx:
            if self.prefix_id is None:
                raise LLMLabError("this tokenizer has no BOS or EOS token to score a text without context after")
            ctx = [self.prefix_id]
        return ctx, tok.encode(continuation)

    def loglikelihood(self, pairs: list[tuple[str, str]]) -> list[LogLik]:
        import torch
        if not pairs:
            return []
        encoded = [self._encode_pair(c, x) for c, x in pairs]
        window = self.llm.engine.context_len
        for ctx, cont in encoded:
            if not cont:
                raise LLMLabError("a continuation to score is empty")
        # keep the most recent context when a pair does not fit the window
        encoded = [(ctx[max(0, len(ctx) + len(cont) - window):], cont) if len(ctx) + len(cont) > window else (ctx, cont)
                   for ctx, cont in encoded]
        # choices of one question share their context: it is run once into a KV cache, and every continuation
        # is scored from there; contexts of several questions are run together in one padded batch
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
            batch, rows, width = [], 0, 0
            for job in jobs + [None]:  # None: flush the last batch
                if job is not None:
                    longest = max(len(encoded[i][1]) for i in job[1])
                    new_rows, new_width = rows + len(job[1]), max(width, len(job[0]) + longest)
                    if not batch or (new_rows <= self.max_batch and new_rows * new_width <= self.batch_tokens):
                        batch.append(job)
                        rows, width = new_rows, new_width
                        continue
                for job_, scores in zip(batch, self._score_jobs(batch, encoded)):
                    for i, sc in zip(job_[1], scores):
                        out[i] = sc
                if job is not None:
                    batch, rows = [job], len(job[1])
                    width = len(job[0]) + max(len(encoded[i][1]) for i in job[1])
        return out

    def _score_jobs(self, jobs, encoded) -> list[list[LogLik]]:
        """One padded forward over the contexts (all but their last token, into a KV cache), then one over
        every continuation prefixed by its context's last token, from a copy of its context's cache row.

        Padding is harmless: a row's padding lands in cache slots after its real tokens, and each
        continuation overwrites those slots before attending to them (a query sees only slots <= its position).
        """
        import torch
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
            logp = torch.log_softmax(logits[row, :len(c)].float(), dim=-1)  # position t predicts token t + 1
            targets = torch.tensor(c, device=dev)
            lp = logp.gather(-1, targets[:, None])[:, 0]
            out[r].append(LogLik(float(lp.sum()), len(c), bool((logp.argmax(-1) == targets).all())))
        return out


    def generate(self, prompts: list, params: GenParams, chat: bool = True) -> list[Generation]:
        from llmlab.engine import SamplingParams
        llm = self.llm
        sp = SamplingParams(max_new_tokens=params.max_tokens, temperature=params.temperature, stop=list(params.stop),
                            seed=params.seed, logprobs=params.top_logprobs > 0, top_logprobs=params.top_logprobs)
        out = []
        for start in range(0, len(prompts), self.gen_batch):
            chunk = prompts[start:start + self.gen_batch]
            ids = [llm.prompt_ids(p, raw=not chat) for p in chunk]
            ids = [p[-(llm.engine.context_len - params.max_tokens):] for p in ids]  # keep the end of a long prompt
            for c in llm.engine.generate(ids, sp):
                g = Generation(c.text, c.prompt_tokens, c.completion_tokens)
                if c.top_logprobs is not None:
                    dec = llm.tokenizer.decode
                    g.tokens = [dec([t]) for t in c.token_ids]
                    g.top_logprobs = [{dec([t]): lp for t, lp in step.items()} for step in c.top_logprobs]
                out.append(g)
        return out


# ---- over HTTP -----------------------------------------------------------------------------------------------


class OpenAIBackend:
    """Any OpenAI-compatible server: /v1/completions (echo + logprobs) scores, /v1/chat/completions generates.

    Each request is retried with exponential backoff on connection errors, timeouts, 429 and 5xx; after the
    last try an LLMLabError names the endpoint and the last error. logprobs=False is for endpoints that return
    no log-probabilities (many hosted APIs): they are never asked for, so scoring raises a clear error and the
    judge falls back to what works without them (G-Eval samples; no forced verdicts).
    """

    def __init__(self, base_url: str, model: str = "default", api_key: str | None = None, retries: int = 4,
                 backoff: float = 0.5, timeout: float = 120.0, concurrency: int = 4, logprobs: bool = True):
        import httpx
        self.base_url = base_url.rstrip("/")
        if not self.base_url.endswith("/v1"):
            self.base_url += "/v1"
        self.model, self.name = model, f"{model}@{self.base_url}"
        self.retries, self.backoff, self.concurrency, self.logprobs = retries, backoff, concurrency, logprobs
        self._template = None  # (compiled chat template, tokenizer info) once fetched; False when there is none
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(timeout=timeout, headers=headers)

    def close(self):
        self.client.close()

    def count_tokens(self, text: str) -> int:
        return max(1, round(len(text) / 4))  # the endpoint's tokenizer is not ours; ~4 characters a token

    def chat_text(self, prompt) -> str | None:
        """The chat rendered with the template the endpoint publishes at /tokenizer_info (llmlab's server does, as
        lm-eval's remote tokenizer expects); None when it publishes none."""
        import httpx
        if self._template is None:
            self._template = False
            try:
                r = self.client.get(self.base_url[:-len("/v1")] + "/tokenizer_info")
                info = r.json() if r.status_code == 200 else {}
            except (httpx.HTTPError, ValueError):  # no template is an answer, not an error: nothing is forced
                info = {}
            if isinstance(info, dict) and info.get("chat_template"):
                from llmlab.tokenizer.tokenizer import _compile_template
                self._template = (_compile_template(info["chat_template"]), info)
        if not self._template:
            return None
        template, info = self._template
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        try:
            return template.render(messages=messages, add_generation_prompt=True, bos_token=info.get("bos_token") or "",
                                   eos_token=info.get("eos_token") or "", pad_token=info.get("pad_token") or "")
        except Exception as e:  # noqa: BLE001 - a template's own errors (raise_exception, bad fields)
            raise LLMLabError(f"the chat template of {self.base_url} failed: {e}") from None

    def _post(self, path: str, body: dict) -> dict:
        import httpx
        url = self.base_url + path
        last = "no attempt"
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                r = self.client.post(url, json=body)
            except httpx.HTTPError as e:
                last = f"{type(e).__name__}: {e}"
                continue
            if r.status_code == 200:
                try:
                    return r.json()
                except ValueError:
                    last = f"invalid JSON in the response: {r.text[:200]!r}"
                    continue
            last = f"HTTP {r.status_code}: {r.text[:200]}"
            if r.status_code not in (408, 409, 429) and r.status_code < 500:
                break  # a client error will not go away by asking again
        raise LLMLabError(f"endpoint {url} failed after {attempt + 1} attempt(s): {last}")

    def _map(self, fn, items):
        """fn over items with a few requests in flight (endpoints batch concurrent requests)."""
        if self.concurrency <= 1 or len(items) <= 1:
            return [fn(x) for x in items]
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(fn, items))

    def loglikelihood(self, pairs: list[tuple[str, str]]) -> list[LogLik]:
        if not self.logprobs:
            raise LLMLabError(f"endpoint {self.base_url} is used without log-probabilities: it cannot score text")

        def one(pair):
            context, continuation = pair
            body = {"model": self.model, "prompt": context + continuation, "max_tokens": 1, "temperature": 0,
                    "echo": True, "logprobs": 1}
            lp = self._post("/completions", body)["choices"][0].get("logprobs")
            if not lp or not lp.get("token_logprobs"):
                raise LLMLabError(f"endpoint {self.base_url} returned no logprobs (it may not support echo)")
            tokens, offsets, values = lp["tokens"], lp["text_offset"], lp["token_logprobs"]
            cut = len(context.rstrip(" "))
            total, n, greedy = 0.0, 0, True
            end = len(context) + len(continuation)
            for tok, off, val, top in zip(tokens, offsets, values, lp.get("top_logprobs") or [None] * len(tokens)):
                if off < cut or off >= end or val is None:
                    continue  # context tokens, the one generated token, or the unscored first token
                total += val
                n += 1
                if top:
                    greedy = greedy and max(top.values()) <= val + 1e-6
            if n == 0:
                raise LLMLabError(f"endpoint {self.base_url} returned no logprobs for the continuation {continuation!r}")
            return LogLik(total, n, greedy)
        return self._map(one, pairs)

    def generate(self, prompts: list, params: GenParams, chat: bool = True) -> list[Generation]:
        if params.top_logprobs and not self.logprobs:
            params = replace(params, top_logprobs=0)  # not asked for: a G-Eval run then samples instead

        def one(prompt):
            body = {"model": self.model, "max_tokens": params.max_tokens, "temperature": params.temperature}
            if params.stop:
                body["stop"] = list(params.stop)
            if params.seed is not None:
                body["seed"] = params.seed
            if chat:
                body["messages"] = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
                if params.top_logprobs:
                    body["logprobs"], body["top_logprobs"] = True, params.top_logprobs
                r = self._post("/chat/completions", body)
                choice = r["choices"][0]
                text = choice["message"]["content"] or ""
                top = tokens = None
                if params.top_logprobs and choice.get("logprobs"):
                    content = choice["logprobs"].get("content") or []
                    tokens = [c["token"] for c in content]
                    top = [{t["token"]: t["logprob"] for t in c.get("top_logprobs", [])} for c in content]
            else:
                body["prompt"] = prompt
                if params.top_logprobs:
                    body["logprobs"] = params.top_logprobs
                r = self._post("/completions", body)
                choice = r["choices"][0]
                text = choice["text"]
                top = tokens = None
                if params.top_logprobs and choice.get("logprobs"):
                    tokens = choice["logprobs"]["tokens"]
                    top = choice["logprobs"]["top_logprobs"]
            usage = r.get("usage") or {}
            return Generation(text, usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0), top, tokens)
        return self._map(one, prompts)


def make_backend(model: str | None = None, endpoint: str | None = None, endpoint_model: str = "default",
                 api_key: str | None = None, dtype: str | None = None, logprobs: bool = True):
    """A backend from CLI-style options: an llmlab model name/path, or an endpoint URL."""
    if endpoint:
        return OpenAIBackend(endpoint, endpoint_model, api_key, logprobs=logprobs)
    from llmlab.api import load
    return LocalBackend(load(model or "smollm2", dtype=dtype))


def as_backend(x) -> Backend:
    """Accept a Backend, an llmlab LLM, or a model name."""
    if hasattr(x, "loglikelihood") and hasattr(x, "generate") and hasattr(x, "count_tokens"):
        return x
    if hasattr(x, "engine"):
        return LocalBackend(x)
    if isinstance(x, (str, Path)):
        return make_backend(model=str(x))
    raise LLMLabError(f"cannot evaluate a {type(x).__name__}: give a Backend, an llmlab LLM or a model name")
