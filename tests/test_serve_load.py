"""The server under load and under fuzzing, with a tiny random model behind SmolLM2's real tokenizer (fast)."""

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from llmlab.api import LLM
from llmlab.checkpoint.gguf import load_gguf
from llmlab.model import ModelConfig, Transformer
from llmlab.serve.testing import running_server


@pytest.fixture(scope="module")
def tiny_llm(smollm2_gguf):
    _, tokenizer, _ = load_gguf(smollm2_gguf)
    cfg = ModelConfig(vocab_size=tokenizer.vocab_size, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128,
                      max_seq_len=256)
    return LLM(Transformer(cfg).init_weights(0).eval(), tokenizer)


def test_concurrent_streaming_clients_all_complete(tiny_llm):
    clients, per_client, max_tokens = 32, 4, 8

    async def one_client(url, c):
        results = []
        async with httpx.AsyncClient(base_url=url, timeout=120) as http:
            for i in range(per_client):
                body = {"model": "tiny", "messages": [{"role": "user", "content": f"client {c} request {i}"}],
                        "max_tokens": max_tokens, "stream": True, "temperature": 1.0, "seed": c * 100 + i,
                        "stream_options": {"include_usage": True}}
                async with http.stream("POST", "/v1/chat/completions", json=body) as r:
                    assert r.status_code == 200, await r.aread()
                    lines = [line async for line in r.aiter_lines() if line.startswith("data: ")]
                assert lines[-1] == "data: [DONE]"
                usage = json.loads(lines[-2][6:])["usage"]
                finish = [ch["finish_reason"] for line in lines[:-1] for ch in json.loads(line[6:])["choices"]
                          if ch["finish_reason"]]
                results.append((usage["completion_tokens"], finish))
        return results

    async def main(url):
        return await asyncio.gather(*(one_client(url, c) for c in range(clients)))

    with running_server(tiny_llm, model_name="tiny", max_batch=16, max_queue=64) as url:
        everything = asyncio.run(main(url))
        health = httpx.get(url + "/health").json()
        metrics = httpx.get(url + "/metrics").text
    flat = [r for client in everything for r in client]
    assert len(flat) == clients * per_client
    for completion_tokens, finish in flat:
        assert 1 <= completion_tokens <= max_tokens and len(finish) == 1
    assert health["busy_rows"] == 0 and health["queue_depth"] == 0
    assert f'llmlab_requests_total{{endpoint="/v1/chat/completions",status="200"}} {clients * per_client}' in metrics


def test_queue_limit_answers_429(tiny_llm):
    with running_server(tiny_llm, model_name="tiny", max_batch=1, max_queue=1) as url:
        async def main():
            async with httpx.AsyncClient(base_url=url, timeout=120) as http:
                body = {"model": "tiny", "prompt": "x", "max_tokens": 200, "temperature": 1.0}
                return await asyncio.gather(*(http.post("/v1/completions", json=body) for _ in range(6)))
        responses = asyncio.run(main())
    codes = sorted(r.status_code for r in responses)
    assert 200 in codes and 429 in codes and set(codes) <= {200, 429}
    busy = next(r for r in responses if r.status_code == 429)
    assert busy.headers["retry-after"] == "1" and busy.json()["error"]["code"] == "queue_full"


def test_request_timeout(tiny_llm):
    with running_server(tiny_llm, model_name="tiny", max_batch=1, request_timeout=0.05) as url:
        r = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 250,
                                                       "temperature": 1.0}, timeout=60)
    assert r.status_code == 408 and r.json()["error"]["code"] == "timeout"


def test_schemathesis_finds_no_server_errors(tiny_llm, tmp_path):
    st = Path(sys.executable).parent / "st"
    if not st.exists():
        pytest.skip("schemathesis is not installed")
    with running_server(tiny_llm, model_name="tiny", max_batch=4, db=str(tmp_path / "f.sqlite")) as url:
        run = subprocess.run(
            [str(st), "run", url + "/openapi.json", "--checks",
             "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance",
             "--max-examples", "15", "--phases", "examples,fuzzing,stateful", "--generation-deterministic", "--request-timeout", "60", "--workers", "2"],
            capture_output=True, text=True, timeout=400, env={**os.environ, "SCHEMATHESIS_HOOKS": ""})
    assert run.returncode == 0, run.stdout[-5000:] + run.stderr[-2000:]
