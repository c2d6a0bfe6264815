"""The model client for any OpenAI-compatible endpoint: llmlab serve, vLLM, llama.cpp's llama-server, hosted APIs."""

from __future__ import annotations

import json
import time
from typing import Iterator

from llmlab.client.base import GenParams, Generation, LogLik, chat_messages
from llmlab.errors import LLMLabError


class EndpointClient:
    """/v1/chat/completions and /v1/completions generate; /v1/completions with echo + logprobs scores.

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
        self.root = self.base_url[:-len("/v1")]
        self.model, self.name = model, f"{model}@{self.base_url}"
        self.retries, self.backoff, self.concurrency, self.logprobs = retries, backoff, concurrency, logprobs
        self._info = None  # /tokenizer_info once fetched ({} when the endpoint has none)
        self._template = None
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(timeout=timeout, headers=headers)

    def close(self):
        self.client.close()

    @property
    def model_id(self) -> str:
        """Which model answers (not where: the same model behind a restarted server or another host is the same):
        the model name sent, or for "default" the first model the endpoint lists."""
        if self.model != "default":
            return self.model
        try:
            listed = self.client.get(self.base_url + "/models").json()["data"]
            return str(listed[0]["id"])
        except Exception:  # noqa: BLE001 - an endpoint without /models: its name is all we know
            return self.model

    # ---- HTTP ----------------------------------------------------------------------------------------------

    def _post(self, path: str, body: dict, root: bool = False) -> dict:
        import httpx
        url = (self.root if root else self.base_url) + path
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

    def tokenizer_info(self) -> dict:
        """What the endpoint publishes at /tokenizer_info (llmlab serve and vLLM do; lm-eval's remote tokenizer
        reads it); {} when it publishes nothing."""
        import httpx
        if self._info is None:
            try:
                r = self.client.get(self.root + "/tokenizer_info")
                info = r.json() if r.status_code == 200 else {}
            except (httpx.HTTPError, ValueError):  # no info is an answer, not an error
                info = {}
            self._info = info if isinstance(info, dict) else {}
        return self._info

    # ---- generation ------------------------------------------------------------------------------------------

    def _body(self, prompt, params: GenParams, chat: bool) -> dict:
        params.validate()
        body = {"model": self.model, "max_tokens": params.max_tokens, "n": params.n, **params.sampling_options()}
        if params.stop:
            body["stop"] = list(params.stop)
        if params.seed is not None:
            body["seed"] = params.seed
        want_logprobs = (params.logprobs or params.top_logprobs > 0) and self.logprobs
        if chat:
            body["messages"] = chat_messages(prompt)
            if want_logprobs:
                body["logprobs"], body["top_logprobs"] = True, params.top_logprobs
        else:
            body["prompt"] = prompt
            if want_logprobs:
                body["logprobs"] = params.top_logprobs
        return body

    def complete(self, prompts: list, params: GenParams, chat: bool = True) -> list[list[Generation]]:
        def one(prompt):
            r = self._post("/chat/completions" if chat else "/completions", self._body(prompt, params, chat))
            usage = r.get("usage") or {}
            choices = sorted(r["choices"], key=lambda c: c.get("index", 0))
            # usage counts all n choices; each generation reports its share of the completion tokens
            per = usage.get("completion_tokens", 0) // max(1, len(choices))
            return [_generation(c, chat, usage.get("prompt_tokens", 0), per) for c in choices]
        return self._map(one, prompts)

    def generate(self, prompts: list, params: GenParams, chat: bool = True) -> list[Generation]:
        return [samples[0] for samples in self.complete(prompts, params, chat)]

    def stream(self, prompt, params: GenParams, chat: bool = True) -> Iterator[str]:
        """Text deltas from the endpoint's server-sent events."""
        import httpx
        if params.n != 1:
            raise LLMLabError("streaming gives one generation: n must be 1")
        body = {**self._body(prompt, params, chat), "stream": True}
        url = self.base_url + ("/chat/completions" if chat else "/completions")
        try:
            with self.client.stream("POST", url, json=body) as r:
                if r.status_code != 200:
                    raise LLMLabError(f"endpoint {url} failed: HTTP {r.status_code}: {r.read()[:200]!r}")
                for line in r.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    event = json.loads(line[len("data: "):])
                    if "error" in event:
                        raise LLMLabError(f"endpoint {url} failed while streaming: {event['error'].get('message')}")
                    for choice in event.get("choices", []):
                        piece = choice.get("delta", {}).get("content") if chat else choice.get("text")
                        if piece:
                            yield piece
        except httpx.HTTPError as e:
            raise LLMLabError(f"endpoint {url} failed: {type(e).__name__}: {e}") from None

    def chat_tools(self, messages: list[dict], tools: list[dict], params: GenParams, tool_choice="auto",
                   parallel_tool_calls: bool = True) -> Generation:
        """One answer through the endpoint's OpenAI tool calling (`tools`, `tool_choice`, `parallel_tool_calls`)."""
        if params.n != 1:
            raise LLMLabError("chat_tools gives one answer: n must be 1")
        body = {**self._body(messages, params, True), "tools": tools, "tool_choice": tool_choice,
                "parallel_tool_calls": parallel_tool_calls}
        r = self._post("/chat/completions", body)
        usage, choice = r.get("usage") or {}, r["choices"][0]
        g = _generation(choice, True, usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0))
        g.tool_calls = [{"id": c.get("id") or f"call_{i}", "type": "function",
                         "function": {"name": c["function"]["name"], "arguments": c["function"].get("arguments") or ""}}
                        for i, c in enumerate(choice["message"].get("tool_calls") or [])]
        return g

    # ---- text facts ------------------------------------------------------------------------------------------

    def count_tokens(self, text: str) -> int:
        return max(1, round(len(text) / 4))  # the endpoint's tokenizer is not ours; ~4 characters a token

    def chat_text(self, prompt) -> str | None:
        """The chat rendered with the template the endpoint publishes at /tokenizer_info; None without one."""
        info = self.tokenizer_info()
        if not info.get("chat_template"):
            return None
        if self._template is None:
            from llmlab.tokenizer.tokenizer import _compile_template as compile_chat_template
            self._template = compile_chat_template(info["chat_template"])
        try:
            return self._template.render(messages=chat_messages(prompt), add_generation_prompt=True,
                                         bos_token=info.get("bos_token") or "", eos_token=info.get("eos_token") or "",
                                         pad_token=info.get("pad_token") or "")
        except Exception as e:  # noqa: BLE001 - a template's own errors (raise_exception, bad fields)
            raise LLMLabError(f"the chat template of {self.base_url} failed: {e}") from None

    # ---- embeddings ------------------------------------------------------------------------------------------

    def embed(self, texts: list[str], model: str | None = None, batch: int = 256):
        """Embeddings of texts from /v1/embeddings, as a float32 array (one row per text). model: the endpoint's
        embedding model (default: the client's model name), e.g. "all-MiniLM-L6-v2" for llmlab serve."""
        import numpy as np
        if not texts:
            raise LLMLabError("nothing to embed")

        def one(start):
            body = {"model": model or self.model, "input": texts[start:start + batch], "encoding_format": "float"}
            data = sorted(self._post("/embeddings", body)["data"], key=lambda d: d["index"])
            return [d["embedding"] for d in data]
        rows = [row for part in self._map(one, list(range(0, len(texts), batch))) for row in part]
        return np.asarray(rows, dtype=np.float32)

    # ---- scoring ---------------------------------------------------------------------------------------------

    def _echo(self, prompt) -> dict:
        """The prompt's own per-token logprobs (echo); prompt is text or token ids."""
        if not self.logprobs:
            raise LLMLabError(f"endpoint {self.base_url} is used without log-probabilities: it cannot score text")
        body = {"model": self.model, "prompt": prompt, "max_tokens": 1, "temperature": 0, "echo": True, "logprobs": 1}
        lp = self._post("/completions", body)["choices"][0].get("logprobs")
        if not lp or not lp.get("token_logprobs"):
            raise LLMLabError(f"endpoint {self.base_url} returned no logprobs (it may not support echo)")
        return lp

    def loglikelihood(self, pairs: list[tuple[str, str]]) -> list[LogLik]:
        def one(pair):
            context, continuation = pair
            lp = self._echo(context + continuation)
            cut, end = len(context.rstrip(" ")), len(context) + len(continuation)
            picked = [(val, top) for off, val, top in zip(lp["text_offset"], lp["token_logprobs"],
                                                         lp.get("top_logprobs") or [None] * len(lp["tokens"]))
                      if cut <= off < end and val is not None]  # not the context, the generated or first token
            if not picked:
                raise LLMLabError(f"endpoint {self.base_url} returned no logprobs for the continuation {continuation!r}")
            return _loglik(picked)
        return self._map(one, pairs)

    def loglikelihood_rolling(self, texts: list[str], stride: int | None = None) -> list[LogLik]:
        """Strided windows as in LocalClient, over token ids from the endpoint's /tokenize (llmlab serve, vLLM)."""
        window = self.tokenizer_info().get("model_max_length")
        if not window:
            raise LLMLabError(f"endpoint {self.base_url} does not publish its context length at /tokenizer_info: "
                              "long texts cannot be scored in windows")
        window = int(window) - 1  # room for the one token the echo request generates
        stride = stride or window // 2

        def one(text):
            ids = self._post("/tokenize", {"model": self.model, "prompt": text, "add_special_tokens": True},
                             root=True)["tokens"]
            total, n, greedy = 0.0, 0, True
            for start in range(1, len(ids), stride):
                end = min(start + stride, len(ids))
                first = max(0, end - window)
                lp = self._echo(ids[first:end])
                tops = lp.get("top_logprobs") or [None] * len(lp["token_logprobs"])
                scored = _loglik(list(zip(lp["token_logprobs"], tops))[start - first:end - first])
                total, n, greedy = total + scored.logprob, n + scored.n_tokens, greedy and scored.greedy
            if n == 0:
                raise LLMLabError("a text to score needs at least two tokens")
            return LogLik(total, n, greedy)
        return self._map(one, texts)


def _loglik(picked: list[tuple[float, dict | None]]) -> LogLik:
    """Sum of (logprob, top logprobs) pairs; greedy when each token was the most likely one listed."""
    total, greedy = 0.0, True
    for val, top in picked:
        total += val
        if top:
            greedy = greedy and max(top.values()) <= val + 1e-6
    return LogLik(total, len(picked), greedy)


def _generation(choice: dict, chat: bool, prompt_tokens: int, completion_tokens: int) -> Generation:
    g = Generation(choice["message"]["content"] or "" if chat else choice["text"],
                   choice.get("finish_reason") or "stop", prompt_tokens, completion_tokens)
    lp = choice.get("logprobs")
    if lp and chat:
        content = lp.get("content") or []
        g.tokens = [c["token"] for c in content]
        g.logprobs = [c["logprob"] for c in content]
        g.top_logprobs = [{t["token"]: t["logprob"] for t in c.get("top_logprobs", [])} for c in content]
    elif lp:
        g.tokens, g.logprobs = lp["tokens"], lp["token_logprobs"]
        g.top_logprobs = lp.get("top_logprobs")
    return g
