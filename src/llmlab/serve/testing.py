"""A real server on a free local port, in a background thread: for tests, benchmarks and evaluation."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from dataclasses import fields

from llmlab.errors import LLMLabError


@contextmanager
def running_server(llm_or_name="smollm2", **options):
    """Start uvicorn with an llmlab server on 127.0.0.1 (a free port); yield its base URL ("http://127.0.0.1:PORT",
    so the OpenAI API is at base + "/v1"); stop it on exit. options: ServerOptions fields (api_keys, max_batch,
    max_len, max_queue, request_timeout, max_body_bytes, db, log_prompts, prefix_cache, model_name)."""
    from llmlab.serve.app import create_app
    from llmlab.serve.state import ServerOptions

    known = {f.name for f in fields(ServerOptions)}
    unknown = set(options) - known
    if unknown:
        raise LLMLabError(f"unknown server option {sorted(unknown)[0]!r}")
    if isinstance(llm_or_name, str):
        from llmlab.api import load
        llm = load(llm_or_name)
        options.setdefault("model_name", llm_or_name)
    else:
        llm = llm_or_name
    app = create_app(llm, ServerOptions(**options))  # (allocates the batcher's cache: parallel work in this thread)
    if llm.engine.native_step is not None:  # as in `llmlab serve`, whose main thread frees its pool at start-up:
        from llmlab.engine.native import release_thread_pool  # the server decodes in its own thread, and a second
        release_thread_pool()  # live OpenMP pool makes libgomp sleep at barriers (see there)
    with serving(app) as url:
        yield url


@contextmanager
def serving(app):
    """Run an already built server app (e.g. one with the arena installed) on a free local port; yield its URL."""
    from llmlab.serve.run import address, bind, uvicorn_server

    sock = bind("127.0.0.1", 0)
    server = uvicorn_server(app, log_level="warning", access_log=False, timeout_graceful_shutdown=2)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="llmlab-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise LLMLabError("the test server did not start")
        time.sleep(0.02)
    try:
        yield address(sock)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
