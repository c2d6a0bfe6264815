"""Shared fixtures: the real SmolLM2 (GGUF path and loaded model) and a tiny chat checkpoint.

Plain helper functions live in tests/helpers.py, imported as `helpers` (pytest puts this directory on the import path).
"""

import os

import pytest

from helpers import make_tiny_chat_checkpoint


@pytest.fixture(scope="session")
def smollm2_gguf():
    """The real SmolLM2-135M-Instruct Q4_1 GGUF, pulled into the llmlab cache on first use."""
    from llmlab.checkpoint.registry import resolve

    return resolve("smollm2")


@pytest.fixture(scope="session")
def smollm2(smollm2_gguf):
    """The real SmolLM2 loaded once per session, fp32. Tests must not change its weights."""
    import torch

    import llmlab

    return llmlab.load("smollm2", dtype=torch.float32, exact=True)  # dense weights, fp32 eager decoding


@pytest.fixture(scope="module")
def fp32_decode():
    """Native steps with fp32 activations for one test module. The default rounds decode steps' activations to int8
    (as llama.cpp does) and prompts' to bf16; a prompt whose cache was computed in another order (the server's prefix
    cache, a batched prefill) differs by float rounding, which that rounding can turn into another greedy token at a
    near-tie. Modules that compare the decode path with another path bit for bit (or log-probs with the scoring
    path) use this. Models loaded meanwhile keep an fp32 KV cache too: fp16 rounds each path's float noise to the
    nearest of values 2^-11 apart, ~1e-3 in a log-probability."""
    from llmlab.engine.native import load_library

    lib = load_library()
    was = (lib.llmlab_int8(-1), lib.llmlab_bf16(-1)) if lib is not None else None  # (-1 reads the state)
    if lib is not None:
        lib.llmlab_int8(0), lib.llmlab_bf16(0)
    kv16 = os.environ.get("LLMLAB_NATIVE_KV16")
    os.environ["LLMLAB_NATIVE_KV16"] = "0"
    yield
    if kv16 is None:
        os.environ.pop("LLMLAB_NATIVE_KV16")
    else:
        os.environ["LLMLAB_NATIVE_KV16"] = kv16
    if lib is not None:
        lib.llmlab_int8(was[0]), lib.llmlab_bf16(was[1])


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """A tiny random Llama with a ChatML BPE tokenizer, saved as an HF directory (one per test module)."""
    return make_tiny_chat_checkpoint(tmp_path_factory.mktemp("tinychat"))


@pytest.fixture(scope="module")
def tiny_tok(tiny_ckpt):
    from llmlab.tokenizer import Tokenizer

    return Tokenizer.from_dir(tiny_ckpt)


CHROMIUM = "/usr/bin/chromium"  # Debian's (scripts/system-deps.sh); never a browser download
# without the background-networking flags Chromium keeps calling out and is refused by this closed network
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def browser():
    """Debian's Chromium driven by Playwright, per module: its sync API holds an event loop that later asyncio.run calls
    would trip over (skipped where Chromium is not installed)."""
    import os
    sync_api = pytest.importorskip("playwright.sync_api")
    if not os.path.exists(CHROMIUM):
        pytest.skip("Chromium is not installed: run scripts/system-deps.sh")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


def pytest_configure(config):
    """Under pytest-xdist (`make test` runs two workers on two cores) each worker computes on one thread: two
    workers of two threads each would fight over the cores."""
    import os
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch
        torch.set_num_threads(1)
