"""/v1/embeddings on a real `llmlab serve` (a subprocess on localhost), called by the `openai` package and by
llmlab's EndpointClient: the vectors are the Embedder's, the usage counts its tokens, bad input is a 4xx."""

import os
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest

from llmlab.client import EndpointClient
from llmlab.rag.embed import Embedder

MODEL = "all-MiniLM-L6-v2"
TEXTS = ["What is the capital of France?", "Cats purr when they are content.", "x",
         "Clara Dale Pemberton was born on August 13, 1982. " * 30]  # the last is cut at 256 tokens
# Same weights and code in another process, batched with other rows: only float32 rounding differs (~1e-7
# measured); 1e-5 leaves room for another CPU's kernels.
TOL = 1e-5


@pytest.fixture(scope="module")
def embedder():
    return Embedder(MODEL)


@pytest.fixture(scope="module")
def server(tiny_ckpt, tmp_path_factory):
    """`llmlab serve` as a user starts it, with a tiny chat model and the default embedding model named."""
    log = tmp_path_factory.mktemp("serve") / "server.log"
    cmd = [sys.executable, "-m", "llmlab.cli", "serve", "--model", str(tiny_ckpt), "--port", "0", "--max-len", "128",
           "--db", "", "--embedding-model", MODEL]
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=dict(os.environ))
    try:
        banner = proc.stdout.readline()
        assert banner.startswith("llmlab serving ") and f"embeddings: {MODEL}" in banner, banner + log.read_text()
        url = banner.split(" at ")[1].split()[0]
        for _ in range(600):
            try:
                httpx.get(url + "/health", timeout=5)
                break
            except httpx.ConnectError:
                assert proc.poll() is None, log.read_text()[-2000:]
                time.sleep(0.05)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def test_openai_client_gets_the_embedders_vectors(server, embedder):
    import openai

    client = openai.OpenAI(base_url=server + "/v1", api_key="unused")
    expected = embedder.encode(TEXTS)
    default = client.embeddings.create(model=MODEL, input=TEXTS)  # the package asks for base64 by default
    floats = client.embeddings.create(model=MODEL, input=TEXTS, encoding_format="float", dimensions=384)
    for reply in (default, floats):
        got = np.array([d.embedding for d in sorted(reply.data, key=lambda d: d.index)])
        assert got.shape == (4, 384)
        assert np.abs(got - expected).max() < TOL
        assert reply.model == MODEL
        # every token the model read, [CLS] and [SEP] included, the long text cut at 256
        assert reply.usage.prompt_tokens == sum(len(ids) for ids in embedder.token_ids(TEXTS))
        assert reply.usage.prompt_tokens == reply.usage.total_tokens
    one = client.embeddings.create(model=MODEL, input=TEXTS[0], encoding_format="float")
    assert len(one.data) == 1 and np.abs(np.array(one.data[0].embedding) - expected[0]).max() < TOL
    # token ids of the model's own tokenizer (no special tokens) embed as the text they spell
    ids = [embedder.tokenizer.encode(t, add_special_tokens=False).ids for t in TEXTS[:2]]
    by_ids = client.embeddings.create(model=MODEL, input=ids, encoding_format="float")
    assert np.abs(np.array([d.embedding for d in by_ids.data]) - expected[:2]).max() < TOL
    single = client.embeddings.create(model=MODEL, input=ids[1], encoding_format="float")
    assert np.abs(np.array(single.data[0].embedding) - expected[1]).max() < TOL


def test_endpoint_client_embed(server, embedder):
    client = EndpointClient(server + "/v1", MODEL)
    got = client.embed(TEXTS, batch=3)  # two requests, in order
    assert got.dtype == np.float32 and np.abs(got - embedder.encode(TEXTS)).max() < TOL


@pytest.mark.parametrize("body, status, param, words", [
    ({"model": "text-embedding-3-small", "input": "hi"}, 404, "model", "does not exist"),
    ({"model": MODEL, "input": "hi", "dimensions": 128}, 400, "dimensions", "cannot be honoured"),
    ({"model": MODEL, "input": []}, 400, "input", "must not be empty"),
    ({"model": MODEL, "input": ["ok", ""]}, 400, "input", "input[1] is an empty string"),
    ({"model": MODEL, "input": [[101, 2000], []]}, 400, "input", "empty list of tokens"),
    ({"model": MODEL, "input": [5, 10 ** 7]}, 400, "input", "outside the embedding model's vocabulary"),
    ({"model": MODEL, "input": [1.5]}, 400, "input", ""),
    ({"model": MODEL, "input": "hi", "encoding_format": "int8"}, 400, "encoding_format", ""),
    ({"model": MODEL, "input": "hi", "truncate": True}, 400, "truncate", "unsupported field"),
    ({"input": "hi"}, 400, "model", "required"),
])
def test_bad_requests_are_4xx_with_openai_bodies(server, body, status, param, words):
    r = httpx.post(server + "/v1/embeddings", json=body, timeout=30)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    # a wrong type inside a list may be named with its position (input.0)
    assert error["param"].startswith(param) and words in error["message"], error


def test_a_server_without_an_embedding_model_says_so(tiny_ckpt):
    from llmlab.serve.testing import running_server

    with running_server(str(tiny_ckpt), max_len=128) as url:
        r = httpx.post(url + "/v1/embeddings", json={"model": MODEL, "input": "hi"}, timeout=30)
    assert r.status_code == 404 and "--embedding-model" in r.json()["error"]["message"]
