"""Serving benchmark: aggregate output tokens/s, p50/p95 time to first token and inter-token latency at 1, 4
and 16 concurrent streaming clients, for llmlab's server and its peers on the same model:

- transformers' `generate` behind a simple server loop (one request at a time, streamed with TextIteratorStreamer);
- llama.cpp's own C++ `llama-server -np N` (continuous batching, N = the most clients) on the same GGUF, when
  benchmarks/build_llamacpp.sh has built it (`--peers llama_server`);
- llama-cpp-python's OpenAI server on the same GGUF, when `llama_cpp` is installed.

Usage: python benchmarks/serve.py [--model smollm2] [--levels 1,4,16] [--requests 2] [--max-tokens 64]
                                  [--peers transformers,llama_server,llama_cpp|none] [--no-prefix-ttft]
                                  [--one-client-rounds 5]
The clients run in a separate process, as they would for any real server.
Writes benchmarks/results/serve.json. Bars: llmlab at 16 clients >= 3x its 1-client tokens/s and above each peer; at 1
client >= 0.9x `generate` on the same requests (median ratio of rounds alternating the two).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx

PROMPTS = ["Write a short story about a robot.", "Explain how rain forms.", "Describe your favourite city.",
           "Give me three tips for learning to cook.", "What makes a good friend?", "Tell me about the moon."]
WARM_UP_PROMPT = "Say hello."  # (none of PROMPTS: see measure)


async def one_client(http, model: str, c: int, requests: int, max_tokens: int, records: list, prompts=PROMPTS):
    for i in range(requests):
        body = {"model": model, "messages": [{"role": "user", "content": prompts[(c + i) % len(prompts)]}],
                "max_tokens": max_tokens, "temperature": 0.7, "seed": c * 1000 + i, "stream": True,
                "stream_options": {"include_usage": True}}
        start = time.perf_counter()
        times, tokens = [], None
        async with http.post("/v1/chat/completions", json=body) as r:
            r.raise_for_status()
            async for raw in r.content:  # (one line at a time)
                line = raw.decode().rstrip("\r\n")
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                if any(ch.get("delta", {}).get("content") for ch in chunk.get("choices", [])):
                    times.append(time.perf_counter())
        records.append({"ttft": times[0] - start if times else None,
                        "itl": [b - a for a, b in zip(times, times[1:])],
                        "tokens": tokens if tokens is not None else len(times)})


def measure(base: str, model: str, clients: int, requests: int, max_tokens: int, warm_up: bool = False) -> dict:
    """The load of `clients` streaming clients, generated in a separate process: in this one, the clients' Python
    would take the GIL from llmlab's server threads (and not from a peer's own process), which is not a server's
    cost and not a fair comparison. warm_up: one request with a prompt the measured ones do not share (a server's
    prefix cache must not hold a measured prompt: the in-process generate it is compared with has none)."""
    args = json.dumps([base, model, clients, requests, max_tokens, warm_up])
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--load", args], capture_output=True,
                          text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure_here(base: str, model: str, clients: int, requests: int, max_tokens: int, warm_up: bool = False) -> dict:
    """The clients are aiohttp's (C-accelerated HTTP parsing): they share the machine's cores with the server, and
    httpx's streaming cost 0.7 ms of CPU per token here against aiohttp's 0.3 (a decode step is ~6 ms on 2 cores).
    The clock starts once the session exists (its set-up is the load generator's, not the server's)."""
    import aiohttp
    records: list = []
    prompts = [WARM_UP_PROMPT] if warm_up else PROMPTS

    async def main():
        # a new connection per request, for every server: llama-server closes a connection after a streamed reply,
        # and a reused one then fails to send the next request
        async with aiohttp.ClientSession(base, timeout=aiohttp.ClientTimeout(total=600),
                                         connector=aiohttp.TCPConnector(force_close=True)) as http:
            start = time.perf_counter()
            await asyncio.gather(*(one_client(http, model, c, requests, max_tokens, records, prompts)
                                   for c in range(clients)))
            return time.perf_counter() - start

    wall = asyncio.run(main())
    ttft = sorted(r["ttft"] for r in records if r["ttft"] is not None)
    itl = sorted(x for r in records for x in r["itl"])

    def pct(xs, p):
        return xs[min(len(xs) - 1, int(p * len(xs)))] if xs else None

    tokens = sum(r["tokens"] for r in records)
    return {"clients": clients, "requests": len(records), "output_tokens": tokens, "seconds": round(wall, 2),
            "tokens_per_s": round(tokens / wall, 2), "ttft_p50": pct(ttft, 0.5), "ttft_p95": pct(ttft, 0.95),
            "itl_p50": pct(itl, 0.5), "itl_p95": pct(itl, 0.95),
            "itl_mean": statistics.fmean(itl) if itl else None}


def generate_in_process(gguf: str, int4: bool, requests: int, max_tokens: int) -> float:
    """generate_tok_s in a process of its own, as `llmlab generate` runs (in the server's process the two would share
    libgomp's thread pools, and each slows the other: see llmlab.engine.native.release_thread_pool; and it imports no
    PyTorch)."""
    args = json.dumps([gguf, int4, requests, max_tokens])
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--generate", args], capture_output=True,
                          text=True, check=True)
    return float(done.stdout.strip().splitlines()[-1])


def generate_tok_s(gguf: str, int4: bool, requests: int, max_tokens: int) -> float:
    """Tokens per second of client 0's requests as `llmlab generate` runs them: the lite runner (the native kernel, no
    PyTorch in the process), or with --int4 llmlab.load's PyTorch path. Same prompts, seeds and options, the model's
    own defaults (generation_config.json, e.g. SmolLM2's top_p 0.9) under the request's, as the server."""
    from llmlab.engine import SamplingParams
    if int4:
        import llmlab
        llm = llmlab.load(gguf, int4=True, announce=False)
        prompt_ids, defaults = llm.prompt_ids, llm.sampling_defaults

        def run(ids, params):
            return llm.engine.generate([ids], params)[0].completion_tokens
    else:
        from llmlab.engine.native.lite import LiteModel
        model = LiteModel(gguf)
        prompt_ids, defaults = model.tokenizer.prompt_ids, model.sampling_defaults

        def run(ids, params):
            list(model.tokens(ids, params))
            return model.sampled
    options = {**defaults, "temperature": 0.7}
    tokens, seconds = 0, 0.0
    for i in range(-1, requests):  # (-1: a warm-up, not counted)
        ids = prompt_ids(PROMPTS[max(i, 0) % len(PROMPTS)])
        start = time.perf_counter()
        sampled = run(ids, SamplingParams(max_new_tokens=max_tokens, seed=max(i, 0), **options))
        if i >= 0:
            # (the sampled tokens count a stop token, as the server's usage does: both sides count the same tokens)
            tokens, seconds = tokens + sampled, seconds + time.perf_counter() - start
    return round(tokens / seconds, 2)


def one_client_rounds(results: dict, base: str, model: str, gguf: str, int4: bool, rounds: int, requests: int,
                      max_tokens: int):
    """The 1-client level against `generate` on the same requests, alternating round by round (this machine's speed
    drifts by 15-30% from minute to minute: one measurement of each, minutes apart, gave anything from 0.73 to 1.12)."""
    ratios, generate = [], []
    for r in range(rounds):
        g = generate_in_process(gguf, int4, requests, max_tokens)
        served = measure(base, model, 1, requests, max_tokens)["tokens_per_s"]
        generate.append(g), ratios.append(served / g)
        print(f"round {r + 1}: generate {g:.1f} tok/s, 1 client of the server {served:.1f} ({served / g:.2f})",
              flush=True)
    results["generate_tok_s"] = round(statistics.median(generate), 2)
    results["one_client"] = {"rounds": rounds, "ratios": [round(x, 3) for x in ratios],
                             "median_ratio": round(statistics.median(ratios), 2) if ratios else None}
    print(f"1 client against generate: median {results['one_client']['median_ratio']} over {rounds} rounds",
          flush=True)


def shared_prefix_ttft(base: str, model: str, system_tokens: int = 500, questions: int = 4) -> float:
    """Median time to the first token of `questions` one-token chat requests that share a ~system_tokens-token system
    prompt (the first request, which fills the prefix cache, is not counted)."""
    system = "You are a helpful assistant for a travel company. " + " ".join(
        f"Rule {i}: answer politely, cite the booking number and keep it short." for i in range(system_tokens // 14))
    times = []
    with httpx.Client(base_url=base, timeout=600) as http:
        for i in range(questions + 1):
            body = {"model": model, "max_tokens": 1, "temperature": 0,
                    "messages": [{"role": "system", "content": system}, {"role": "user", "content": PROMPTS[i % 6]}]}
            start = time.perf_counter()
            http.post("/v1/chat/completions", json=body).raise_for_status()
            times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


# ---- peers ---------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def transformers_server(gguf: Path):
    """transformers' generate behind the simplest server: one request at a time, streamed."""
    import torch
    import uvicorn
    from fastapi import FastAPI
    from fastapi.responses import StreamingResponse
    from transformers import AutoModelForCausalLM, AutoTokenizer, TextIteratorStreamer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    lock = threading.Lock()
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(body: dict):
        ids = tok.apply_chat_template(body["messages"], add_generation_prompt=True, return_tensors="pt")
        if not isinstance(ids, torch.Tensor):
            ids = ids["input_ids"]
        streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
        count = {"n": 0}

        def run():
            with lock, torch.no_grad():
                out = model.generate(ids, max_new_tokens=body["max_tokens"], do_sample=True,
                                     temperature=body.get("temperature", 1.0), streamer=streamer)
                count["n"] = out.shape[1] - ids.shape[1]

        thread = threading.Thread(target=run)
        thread.start()

        async def events():
            loop = asyncio.get_running_loop()
            iterator = iter(streamer)
            while True:
                piece = await loop.run_in_executor(None, next, iterator, None)
                if piece is None:
                    break
                if piece:
                    yield f"data: {json.dumps({'choices': [{'index': 0, 'delta': {'content': piece}}]})}\n\n"
            await loop.run_in_executor(None, thread.join)
            yield f"data: {json.dumps({'choices': [], 'usage': {'completion_tokens': count['n']}})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@contextmanager
def llama_cpp_server(gguf: Path):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1",
                             "--port", str(port), "--n_ctx", "2048"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(base + "/v1/models").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--levels", default="1,4,16")
    parser.add_argument("--requests", type=int, default=2, help="requests per client")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--peers", default="transformers,llama_server,llama_cpp")
    parser.add_argument("--int4", action="store_true", help="serve llmlab with 4-bit decode copies (llmlab.load int4)")
    parser.add_argument("--no-prefix-ttft", action="store_true", help="skip the shared-system-prompt TTFT runs")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "serve.json"))
    parser.add_argument("--one-client-rounds", type=int, default=5,
                        help="rounds of `generate` against 1 client of the server, alternating (their median ratio)")
    parser.add_argument("--load", help=argparse.SUPPRESS)  # internal: be the clients' process (see measure)
    parser.add_argument("--generate", help=argparse.SUPPRESS)  # internal: be generate's process
    args = parser.parse_args()
    if args.load:
        print(json.dumps(measure_here(*json.loads(args.load))))
        return 0
    if args.one_client_rounds < 1:
        parser.error(f"--one-client-rounds must be at least 1, got {args.one_client_rounds}")
    if args.generate:
        print(generate_tok_s(*json.loads(args.generate)))
        return 0
    levels = [int(x) for x in args.levels.split(",")]

    import llmlab
    from llmlab.checkpoint.registry import resolve
    from llmlab.io import atomic_write_text
    from llmlab.serve.testing import running_server

    gguf = Path(resolve(args.model))
    results = {"model": str(gguf.name), "max_tokens": args.max_tokens, "requests_per_client": args.requests,
               "servers": {}}

    def run(name, base, model):
        measure(base, model, 1, 1, 8, warm_up=True)  # a server's first request pays one-time set-up (routes, caches)
        rows = []
        for clients in levels:
            try:
                row = measure(base, model, clients, args.requests, args.max_tokens)
            except subprocess.CalledProcessError as e:  # (a peer refusing a request: say so, keep the other rows)
                print(f"{name:>13} clients={clients:>2} failed: {e.stderr.strip().splitlines()[-1]}", flush=True)
                continue
            print(f"{name:>13} clients={clients:>2} tok/s={row['tokens_per_s']:>7} ttft p50={row['ttft_p50']:.3f}s "
                  f"p95={row['ttft_p95']:.3f}s itl p50={row['itl_p50']:.4f}s p95={row['itl_p95']:.4f}s", flush=True)
            rows.append(row)
        results["servers"][name] = rows

    llm = llmlab.load(gguf, int4=args.int4)
    results["llmlab_int4"] = args.int4
    with running_server(llm, model_name=args.model, max_batch=max(levels), max_len=1024) as base:
        run("llmlab", base, args.model)
        if 1 in levels:  # what the 1-client level is held to: the same requests through `generate`, alternating
            one_client_rounds(results, base, args.model, str(gguf), args.int4, args.one_client_rounds, args.requests,
                              args.max_tokens)
        if not args.no_prefix_ttft:
            cached = shared_prefix_ttft(base, args.model)
    if not args.no_prefix_ttft:
        with running_server(llm, model_name=args.model, max_batch=max(levels), max_len=1024,
                            prefix_cache=False) as base:
            uncached = shared_prefix_ttft(base, args.model)
        results["shared_prefix_ttft"] = {"system_tokens": 500, "cached_s": round(cached, 3),
                                         "uncached_s": round(uncached, 3)}
        print(f"TTFT with a shared 500-token system prompt: {cached:.3f} s cached, {uncached:.3f} s without the "
              f"prefix cache ({uncached / cached:.1f}x)", flush=True)
    del llm
    peers = args.peers.split(",")
    if "transformers" in peers:
        with transformers_server(gguf) as base:
            run("transformers", base, args.model)
    if "llama_server" in peers:
        sys.path.insert(0, str(Path(__file__).parent))
        import llamacpp
        if not (llamacpp.bin_dir() / "llama-server").is_file():
            print("llama-server is not built (bash benchmarks/build_llamacpp.sh): skipping that peer")
        else:
            with llamacpp.server(gguf, free_port(), threads=2, parallel=max(levels), ctx=1024) as base:
                run("llama_server", base.removesuffix("/v1"), args.model)
    if "llama_cpp" in peers:
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            print("llama-cpp-python is not installed: skipping that peer")
        else:
            with llama_cpp_server(gguf) as base:
                run("llama_cpp", base, args.model)

    ours = {r["clients"]: r["tokens_per_s"] for r in results["servers"]["llmlab"]}
    top = max(levels)
    verdict = {"scaling": round(ours[top] / ours[min(levels)], 2),
               "one_client_vs_generate": results.get("one_client", {}).get("median_ratio"),
               "scaling_bar_met": ours[top] >= 3 * ours[min(levels)],
               "above_peers": {name: ours[top] > {r["clients"]: r["tokens_per_s"] for r in rows}.get(top, 0)
                               for name, rows in results["servers"].items() if name != "llmlab"}}
    results["verdict"] = verdict
    print(json.dumps(verdict))
    atomic_write_text(args.out, json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
