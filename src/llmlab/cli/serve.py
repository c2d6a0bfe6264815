"""`llmlab serve` (the OpenAI-compatible server and web chat) and `llmlab feedback export`."""

from __future__ import annotations

import logging
import os


def add_commands(subparsers):
    p = subparsers.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API, with a web chat at /")
    p.add_argument("-m", "--model", default="smollm2", help="registry name, checkpoint directory or .gguf file")
    p.add_argument("--dtype", default="float32", help="float32 | bfloat16")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step (slow start, fast decode)")
    p.add_argument("--int4", action="store_true", help="decode with 4-bit weight copies (CPU; exact for Q4_1 GGUF)")
    p.add_argument("--exact", action="store_true", help="fp32 eager decoding (parity work)")
    from llmlab.client import add_context_args
    add_context_args(p)  # --rope-scaling, --self-extend
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 exposes the server to the network)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (1-65535; 0: any free port)")
    p.add_argument("--api-key", action="append", default=[], dest="api_keys",
                   help="require 'Authorization: Bearer KEY' on the API (repeatable)")
    p.add_argument("--max-batch", type=int, default=16, help="sequences generated at once")
    p.add_argument("--max-len", type=int, default=2048, help="tokens per sequence (prompt + answer)")
    p.add_argument("--max-queue", type=int, default=64, help="waiting requests before answering 429")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds a request may take")
    p.add_argument("--max-body", type=int, default=1_000_000, help="largest request body in bytes")
    p.add_argument("--db", default=None,
                   help="SQLite file for the web chat's feedback (default: feedback.sqlite in $LLMLAB_HOME, "
                        "~/.cache/llmlab; '' turns it off)")
    p.add_argument("--log-prompts", action="store_true", help="write prompt text to the log")
    from llmlab.cli.marks import add_watermark_args
    add_watermark_args(p)  # --watermark KEY: every answer is watermarked (llmlab.safety.watermark)
    p.add_argument("--speculate", default=None, metavar="KIND",
                   help="decode requests with n=1 and no constraint speculatively: lookup (n-grams of the context), "
                        "self (the model's 4-bit copy drafts) or draft:PATH (a small model with the same tokenizer)")
    p.add_argument("--embedding-model", default=None,
                   help="served at /v1/embeddings: a name (all-MiniLM-L6-v2) or model directory (default: "
                        "all-MiniLM-L6-v2 when it is already downloaded; '' turns embeddings off)")
    p.set_defaults(func=cmd_serve)

    p = subparsers.add_parser("feedback", help="the web chat's feedback")
    sub = p.add_subparsers(dest="feedback_command", required=True)
    e = sub.add_parser("export", help="write SFT conversations and preference pairs as JSONL")
    e.add_argument("--db", default=None, help="the server's feedback database (default: the one `llmlab serve` uses)")
    e.add_argument("--sft", help="JSONL of up-voted conversations: {\"messages\": [...]}")
    e.add_argument("--pairs", help="JSONL of preference pairs: {\"messages\", \"chosen\", \"rejected\"}")
    e.set_defaults(func=cmd_feedback_export)


def cmd_serve(args) -> int:
    from llmlab.api import load
    from llmlab.errors import LLMLabError
    from llmlab.rag.embed import DEFAULT_EMBEDDING_MODEL, embedding_model_cached
    from llmlab.serve.app import create_app
    from llmlab.serve.feedback import FeedbackStore, default_db
    from llmlab.serve.run import address, bind, uvicorn_server
    from llmlab.serve.state import ServerOptions

    for name in ("max_batch", "max_len", "max_queue", "max_body"):
        if getattr(args, name) < 1:
            raise LLMLabError(f"--{name.replace('_', '-')} must be at least 1")
    if args.timeout <= 0:
        raise LLMLabError("--timeout must be more than 0 seconds")
    from llmlab.cli.marks import install_watermark, watermark_config
    watermark = watermark_config(args)  # refused with --speculate
    if args.speculate:
        from llmlab.engine.draft import check_speculate
        check_speculate(args.speculate)
    sock = bind(args.host, args.port)  # first: a bad or busy port is one error line, nothing written
    db = default_db() if args.db is None else args.db
    if db:  # opened once now: an unusable path is one error line here, not a traceback from the server's startup
        os.makedirs(os.path.dirname(os.path.abspath(db)), exist_ok=True)
        FeedbackStore(db).close()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    embedding_model = args.embedding_model
    if embedding_model is None:  # the default only when it needs no download at startup
        embedding_model = DEFAULT_EMBEDDING_MODEL if embedding_model_cached() else None
    llm = load(args.model, dtype=args.dtype, compile=args.compile, int4=args.int4, exact=args.exact,
               rope_scaling=args.rope_scaling, self_extend=args.self_extend)
    install_watermark(llm, watermark)
    options = ServerOptions(model_name=args.model, api_keys=args.api_keys, max_batch=args.max_batch,
                            max_len=args.max_len, max_queue=args.max_queue, request_timeout=args.timeout,
                            max_body_bytes=args.max_body, db=db or None, log_prompts=args.log_prompts,
                            speculate=args.speculate,
                            embedding_model=embedding_model or None)
    app = create_app(llm, options)
    print(f"llmlab serving {args.model} at {address(sock)}  (web chat: /, API: /v1)"
          + (f"; embeddings: {embedding_model}" if embedding_model else "")
          + (f"; feedback -> {db}" if db else ""), flush=True)
    uvicorn_server(app, log_level="info").run(sockets=[sock])
    return 0


def cmd_feedback_export(args) -> int:
    from llmlab.errors import LLMLabError
    from llmlab.serve.feedback import default_db, export_feedback

    if not args.sft and not args.pairs:
        raise LLMLabError("give --sft FILE and/or --pairs FILE")
    counts = export_feedback(default_db() if args.db is None else args.db, args.sft, args.pairs)
    print(f"{counts['sft']} SFT conversations" + (f" -> {args.sft}" if args.sft else "") +
          f", {counts['pairs']} preference pairs" + (f" -> {args.pairs}" if args.pairs else ""))
    return 0
