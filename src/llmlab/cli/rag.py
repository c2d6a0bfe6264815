"""CLI: `llmlab rag index|search|ask|eval|evalset` (thin wrappers over llmlab.rag)."""

from __future__ import annotations

import json

from llmlab.errors import LLMLabError

# llmlab.rag's search methods, rerank scorers and embedding model, named here so that building the parser does not
# import llmlab.rag.index (its embedder imports torch); the library refuses anything else, and
# tests/test_cli_startup.py checks that these agree with llmlab.rag.index.METHODS, llmlab.rag.answer.RERANK_SCORERS
# and llmlab.rag.embed.DEFAULT_EMBEDDING_MODEL
SEARCH_METHODS = ("bm25", "dense", "hybrid")
RERANK_SCORERS = ("yes", "question")
DEFAULT_EMBEDDING_MODEL = "all-MiniLM-L6-v2"


def _index(args) -> int:
    from llmlab.rag.index import build_index

    r = build_index(args.docs, args.out, embedding_model=args.embedding_model, chunking=args.chunking,
                    chunk_size=args.chunk_size, overlap=args.overlap)
    print(f"indexed {r.files} file(s) into {args.out}: {r.chunks} chunks ({r.embedded_chunks} embedded now; "
          f"{r.reused_files} unchanged file(s) reused, {r.indexed_files} (re)indexed, {r.removed_files} dropped), "
          f"dense search: {r.dense_backend}, {r.seconds:.1f} s")
    return 0


def _search(args) -> int:
    from llmlab.rag.index import RagIndex

    hits = RagIndex.load(args.index).search(args.query, k=args.k, method=args.method)
    if args.json:
        print(json.dumps([h.to_dict() for h in hits], ensure_ascii=False, indent=1))
        return 0
    for h in hits:
        text = " ".join(h.chunk.text.split())
        print(f"{h.rank}. [{h.chunk.chunk_id}] {h.score:.4f}" + (f"  ({h.chunk.heading})" if h.chunk.heading else ""))
        print(f"   {text[:300]}{'...' if len(text) > 300 else ''}")
    if not hits:
        print("no matches")
    return 0


def _ask(args) -> int:
    from llmlab.client import client_from_args
    from llmlab.rag.answer import ask
    from llmlab.rag.index import RagIndex

    index = RagIndex.load(args.index)
    client = client_from_args(args)
    answer = ask(index, client, args.question, k=args.k, method=args.method, rerank_candidates=args.rerank,
                 max_tokens=args.max_tokens, seed=args.seed, rerank_scorer=args.rerank_scorer)
    if args.json:
        print(json.dumps(answer.to_dict(), ensure_ascii=False, indent=1))
        return 0
    print(answer.text)
    print()
    cited = set(answer.cited)
    for n, h in enumerate(answer.passages, start=1):
        print(f"{'*' if h.chunk.chunk_id in cited else ' '} [{n}] {h.chunk.chunk_id}")
    if not answer.cited:
        print("(the answer cites no passage)")
    return 0


def _eval(args) -> int:
    from llmlab.rag.index import RagIndex
    from llmlab.rag.metrics import evaluate, format_table, read_questions

    if args.n_answers is not None and args.n_answers < 1:
        raise LLMLabError(f"--n-answers must be at least 1, got {args.n_answers}")
    index = RagIndex.load(args.index)
    questions = read_questions(args.questions)
    try:
        ks = tuple(int(k) for k in args.k.split(","))
    except ValueError:
        raise LLMLabError(f"-k must be comma-separated whole numbers, got {args.k!r}") from None
    results = evaluate(index, questions, methods=args.methods.split(","), ks=ks)
    if not args.answers:
        print(json.dumps(results, indent=1) if args.json else format_table(results))
        return 0
    from llmlab.client import client_from_args
    from llmlab.rag.faithfulness import evaluate_answers, format_answers

    judge = client_from_args(args, "judge") if args.judge_model or args.judge_endpoint else None
    answers = evaluate_answers(index, client_from_args(args), questions[:args.n_answers], k=args.answer_k,
                               method=args.answer_method, max_tokens=args.max_tokens, judge=judge)
    if args.json:
        print(json.dumps({"retrieval": results, "answers": answers}, indent=1))
    else:
        print(format_table(results))
        print()
        print(format_answers(answers))
    return 0


def _evalset(args) -> int:
    from llmlab.rag.evalset import write_bios_evalset

    out = write_bios_evalset(args.out, n_people=args.people, seed=args.seed)
    print(f"wrote {out}/corpus/biographies.jsonl and {out}/questions.jsonl; next: "
          f"llmlab rag index {out}/corpus --out {out}/index && llmlab rag eval {out}/index {out}/questions.jsonl")
    return 0


def add_commands(subparsers) -> None:
    from llmlab.client import add_client_args
    from llmlab.rag.chunk import CHUNK_MODES

    rag = subparsers.add_parser("rag", help="retrieval: index documents, search them, answer with citations")
    sub = rag.add_subparsers(dest="rag_command", required=True, metavar="COMMAND")

    p = sub.add_parser("index", help="index text, Markdown and JSONL files (re-indexes changed files only)")
    p.add_argument("docs", nargs="+", help="files or directories (.txt .md .markdown .rst .jsonl)")
    p.add_argument("--out", required=True, help="the index directory")
    p.add_argument("--embedding-model", default=DEFAULT_EMBEDDING_MODEL, help="name or model directory")
    p.add_argument("--chunking", choices=CHUNK_MODES, default="structure",
                   help="structure: Markdown headings and paragraphs; tokens: fixed windows")
    p.add_argument("--chunk-size", type=int, default=192, help="most tokens per chunk")
    p.add_argument("--overlap", type=int, default=32, help="tokens shared by consecutive windows")
    p.set_defaults(func=_index)

    def add_search_args(p, k):
        p.add_argument("-k", type=int, default=k, help="passages to return")
        p.add_argument("--method", choices=SEARCH_METHODS, default="hybrid", help="hybrid = BM25 + dense, fused by RRF")
        p.add_argument("--json", action="store_true")

    p = sub.add_parser("search", help="the best chunks for a query")
    p.add_argument("index")
    p.add_argument("query")
    add_search_args(p, 5)
    p.set_defaults(func=_search)

    p = sub.add_parser("ask", help="answer a question from the index, citing chunk ids")
    p.add_argument("index")
    p.add_argument("question")
    add_search_args(p, 4)
    p.add_argument("--rerank", type=int, default=0, metavar="N",
                   help="rerank the best N retrieved chunks with the model before keeping k (0: no reranking)")
    p.add_argument("--rerank-scorer", choices=RERANK_SCORERS, default="question",
                   help="question: log-likelihood of the question given the passage (better with SmolLM2, measured); "
                        "yes: normalised log-likelihood of \"Yes\" to \"does the passage answer the question\"")
    p.add_argument("-n", "--max-tokens", type=int, default=200)
    p.add_argument("--seed", type=int, default=None)
    add_client_args(p)
    p.set_defaults(func=_ask)

    p = sub.add_parser("eval", help="recall@k, MRR and nDCG@10 against questions with relevant document ids")
    p.add_argument("index")
    p.add_argument("questions", help='JSONL: {"question": ..., "relevant": [document ids]}')
    p.add_argument("--methods", default="bm25,dense,hybrid")
    p.add_argument("-k", default="1,5,10", help="cut-offs for recall, comma-separated")
    p.add_argument("--json", action="store_true")
    p.add_argument("--answers", action="store_true",
                   help="also answer the questions with gold answers (\"answers\": [...]) through the model and report "
                        "correctness, faithfulness to the passages (judged by the model) and the judge's reliability")
    p.add_argument("--n-answers", type=int, default=None, metavar="N", help="answer only the first N questions")
    p.add_argument("--answer-k", type=int, default=4, help="passages shown to the model per answer")
    p.add_argument("--answer-method", choices=SEARCH_METHODS, default="hybrid", help="retrieval for the answers")
    p.add_argument("--max-tokens", type=int, default=64, help="most tokens per answer")
    add_client_args(p)
    add_client_args(p, prefix="judge")  # the faithfulness judge (default: the answering model)
    p.set_defaults(func=_eval)

    p = sub.add_parser("evalset", help="write a retrieval eval set from the bios world (no download)")
    p.add_argument("--out", required=True)
    p.add_argument("--people", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_evalset)
