"""The server with real clients: the official `openai` package and raw HTTP against SmolLM2 served by a real uvicorn."""

import json
import time

import httpx
import jsonschema
import openai
import pytest

from llmlab.api import load
from llmlab.serve.testing import running_server

MODEL = "smollm2"


@pytest.fixture(scope="module")
def llm(smollm2_gguf):
    return load(smollm2_gguf)


@pytest.fixture(scope="module")
def server(llm):
    with running_server(llm, model_name=MODEL, max_batch=8, max_len=512, max_body_bytes=20_000) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=120)


def chat(client, content, **kw):
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}], **kw)


def test_models(client):
    assert [m.id for m in client.models.list()] == [MODEL]


def test_chat_matches_the_engine_and_counts_usage(client, llm):
    r = chat(client, "What is the capital of France?", max_tokens=12, temperature=0)
    expected = llm.complete([{"role": "user", "content": "What is the capital of France?"}],
                            max_new_tokens=12, temperature=0)
    assert r.choices[0].message.content == expected.text
    assert r.choices[0].finish_reason == expected.finish_reason
    assert r.usage.prompt_tokens == expected.prompt_tokens
    assert r.usage.completion_tokens == expected.completion_tokens
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_completion_and_prompt_logprobs(client, llm):
    prompt = "The capital of France is"
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0, echo=True, logprobs=2)
    expected = llm.generate(prompt, raw=True, max_new_tokens=6, temperature=0)
    choice = r.choices[0]
    assert choice.text == prompt + expected
    ids = llm.tokenizer.encode(prompt, add_special_tokens=True)
    lp = choice.logprobs
    assert len(lp.tokens) == len(ids) + r.usage.completion_tokens
    assert lp.token_logprobs[0] is None
    # the prompt's logprobs, independently from the engine's scorer
    reference = llm.logprobs(llm.tokenizer.decode(ids[:1]), llm.tokenizer.decode(ids[1:]))
    assert lp.token_logprobs[1:len(ids)] == pytest.approx(reference, abs=1e-3)
    for chosen, top in zip(lp.token_logprobs[1:], lp.top_logprobs[1:]):
        assert chosen <= max(top.values()) + 1e-6 and len(top) >= 2
    # generated at temperature 0: each generated token is the most likely one
    for chosen, top in zip(lp.token_logprobs[len(ids):], lp.top_logprobs[len(ids):]):
        assert chosen == pytest.approx(max(top.values()))
    assert r.usage.prompt_tokens == len(ids)


def test_streaming_joins_to_the_whole_answer(client, server):
    whole = chat(client, "Name three fruits.", max_tokens=16, temperature=0).choices[0].message.content
    stream = chat(client, "Name three fruits.", max_tokens=16, temperature=0, stream=True,
                  stream_options={"include_usage": True})
    pieces, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for c in chunk.choices:
            pieces.append(c.delta.content or "")
            finish = c.finish_reason or finish
    assert "".join(pieces) == whole
    assert finish in ("stop", "length") and usage.completion_tokens > 0
    # the raw event stream ends with [DONE]
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 4, "stream": True}
    with httpx.stream("POST", server + "/v1/completions", json=body, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    assert all(json.loads(e[6:])["object"] == "text_completion" for e in events[:-1])


def test_n_and_seed_reproducibility(client):
    kw = dict(max_tokens=10, temperature=1.0, n=3, seed=1234)
    a = chat(client, "Write a word.", **kw)
    b = chat(client, "Write a word.", **kw)
    texts_a = [c.message.content for c in sorted(a.choices, key=lambda c: c.index)]
    texts_b = [c.message.content for c in sorted(b.choices, key=lambda c: c.index)]
    assert [c.index for c in sorted(a.choices, key=lambda c: c.index)] == [0, 1, 2]
    assert texts_a == texts_b
    assert len(set(texts_a)) > 1  # the n completions are different samples
    assert a.usage.completion_tokens <= 3 * 10 and a.usage.completion_tokens >= 3
    c = chat(client, "Write a word.", max_tokens=10, temperature=1.0, n=3, seed=99)
    assert [x.message.content for x in sorted(c.choices, key=lambda c: c.index)] != texts_a


PERSON = {"type": "object", "properties": {
    "name": {"type": "string"}, "age": {"type": "integer"}, "email": {"type": "string"},
    "role": {"type": "string", "enum": ["admin", "user"]}, "tags": {"type": "array", "items": {"type": "string"}},
    "active": {"type": "boolean"}}, "required": ["name", "age", "role"], "additionalProperties": False}


@pytest.mark.parametrize("temperature,max_tokens", [(0, 60), (1.0, 60), (1.0, 15)])
def test_json_schema_output_validates(client, temperature, max_tokens):
    r = chat(client, "Describe a user of a website as JSON.", max_tokens=max_tokens, temperature=temperature,
             seed=3, response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}})
    content = r.choices[0].message.content
    jsonschema.validate(json.loads(content), PERSON)
    assert r.usage.completion_tokens <= max_tokens


def test_json_object_output_parses(client):
    r = chat(client, "List two colors in JSON.", max_tokens=20, temperature=0.8, seed=5,
             response_format={"type": "json_object"})
    assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_chat_logprobs(client):
    r = chat(client, "Hi!", max_tokens=5, temperature=0, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) >= 1
    assert "".join(t.token for t in content) == r.choices[0].message.content
    for t in content:
        assert len(t.top_logprobs) == 3
        assert t.logprob == pytest.approx(t.top_logprobs[0].logprob)  # greedy: the top token was chosen
        assert t.logprob <= 0


def test_stop_string(client):
    r = client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=12, temperature=0, stop=[" 7"])
    assert " 7" not in r.choices[0].text and r.choices[0].finish_reason == "stop"
    assert "5" in r.choices[0].text


# ---- bad input: the documented 4xx with OpenAI's error body ------------------------------------------------------


def post(server, path, body=None, content=None, headers=None):
    return httpx.post(server + path, json=body, content=content, headers=headers, timeout=60)


def error_of(r, status):
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


def test_bad_input(server):
    msgs = [{"role": "user", "content": "hi"}]
    assert "JSON" in error_of(post(server, "/v1/chat/completions", content=b"{not json",
                                   headers={"content-type": "application/json"}), 400)["message"]
    e = error_of(post(server, "/v1/chat/completions", {"model": MODEL, "messages": msgs, "max_tokens": "many"}), 400)
    assert e["param"] == "max_tokens"
    e = error_of(post(server, "/v1/chat/completions", {"model": MODEL, "messages": msgs, "max_tokens": -5}), 400)
    assert e["param"] == "max_tokens"
    e = error_of(post(server, "/v1/chat/completions", {"model": MODEL, "messages": msgs, "max_tokens": 100000}), 400)
    assert e["code"] == "context_length_exceeded" and "512" in e["message"] and "100000" in e["message"]
    e = error_of(post(server, "/v1/chat/completions", {"model": MODEL, "messages": []}), 400)
    assert e["param"] == "messages"
    e = error_of(post(server, "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "wizard",
                                                                                     "content": "x"}]}), 400)
    assert "role" in e["param"]
    e = error_of(post(server, "/v1/chat/completions", {"model": "gpt-9", "messages": msgs}), 404)
    assert e["code"] == "model_not_found"
    error_of(post(server, "/v1/chat/completions", {"messages": msgs}), 400)  # no model
    error_of(post(server, "/v1/completions", {"model": MODEL, "prompt": "x", "temperature": 7}), 400)
    error_of(post(server, "/v1/completions", {"model": MODEL, "prompt": [10 ** 9]}), 400)
    error_of(post(server, "/v1/chat/completions", {"model": MODEL, "messages": msgs, "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "array", "uniqueItems": True}}}}), 400)  # unsupported keyword
    big = {"model": MODEL, "messages": [{"role": "user", "content": "x" * 50_000}]}
    assert "limit" in error_of(post(server, "/v1/chat/completions", big), 413)["message"]
    error_of(httpx.get(server + "/v1/nothing-here"), 404)


def test_api_keys(llm):
    with running_server(llm, model_name=MODEL, max_batch=1, max_len=128, api_keys=["sekret"]) as url:
        e = error_of(httpx.get(url + "/v1/models"), 401)
        assert e["type"] == "authentication_error"
        error_of(httpx.get(url + "/v1/models", headers={"Authorization": "Bearer wrong"}), 401)
        assert httpx.get(url + "/v1/models", headers={"Authorization": "Bearer sekret"}).status_code == 200
        assert httpx.get(url + "/health").status_code == 200  # the health check stays open
        good = openai.OpenAI(base_url=url + "/v1", api_key="sekret", max_retries=0)
        assert good.completions.create(model=MODEL, prompt="Hi", max_tokens=2).usage.completion_tokens == 2


def test_disconnect_frees_the_row_and_metrics_count(server):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Write a long story about a dragon."}],
            "max_tokens": 400, "stream": True}
    with httpx.stream("POST", server + "/v1/chat/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                break  # one piece arrived: now go away
    for _ in range(200):
        health = httpx.get(server + "/health").json()
        if health["busy_rows"] == 0:
            break
        time.sleep(0.05)
    assert health["busy_rows"] == 0
    metrics = httpx.get(server + "/metrics").text
    cancelled = [line for line in metrics.splitlines() if line.startswith("llmlab_cancelled_total ")]
    assert int(cancelled[0].split()[1]) >= 1
    assert 'llmlab_requests_total{endpoint="/v1/chat/completions",status="200"}' in metrics
    assert "llmlab_time_to_first_token_seconds_bucket" in metrics
    assert "llmlab_queue_depth 0" in metrics


def test_mailbox_delivers_every_event_in_order_with_few_wakeups():
    """The batcher's events reach each request's asyncio queue in order; a burst wakes the event loop once, not per
    event (what keeps a 16-row step from waking the loop 16 times)."""
    import asyncio
    import threading

    from llmlab.serve.state import Mailbox

    async def main():
        loop = asyncio.get_running_loop()
        mailbox, queues = Mailbox(loop), [asyncio.Queue(), asyncio.Queue()]
        wakeups = 0
        deliver = mailbox.deliver

        def counted():
            nonlocal wakeups
            wakeups += 1
            deliver()
        mailbox.deliver = counted
        burst = threading.Thread(target=lambda: [mailbox.put(queues[i % 2], i) for i in range(200)])
        burst.start()
        burst.join()  # the loop cannot run while the burst is sent, as in a batcher step
        got = [[await q.get() for _ in range(100)] for q in queues]
        return got, wakeups

    got, wakeups = asyncio.run(main())
    assert got == [list(range(0, 200, 2)), list(range(1, 200, 2))]
    assert wakeups == 1
