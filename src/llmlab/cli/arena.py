"""`llmlab arena serve|leaderboard|agreement|battles|export`: models side by side, votes, ratings, label quality."""

from __future__ import annotations

import json
import logging
import os


def add_commands(subparsers):
    p = subparsers.add_parser("arena", help="two anonymous models side by side: votes, leaderboard, label quality")
    sub = p.add_subparsers(dest="arena_command", required=True)

    s = sub.add_parser("serve", help="serve two or more models; the arena page is at /arena")
    s.add_argument("-m", "--model", action="append", default=[], required=True, dest="models",
                   help="[NAME=]MODEL (registry name, checkpoint directory or .gguf); MODEL:int4 decodes with 4-bit "
                        "weights. Twice or more: each battle draws two at random")
    s.add_argument("--dtype", default="float32", help="float32 | bfloat16")
    s.add_argument("--host", default="127.0.0.1", help="address to bind")
    s.add_argument("--port", type=int, default=8000, help="TCP port (0: any free port)")
    s.add_argument("--max-batch", type=int, default=8, help="sequences generated at once, per model")
    s.add_argument("--max-len", type=int, default=2048, help="tokens per sequence (prompt + answer)")
    s.add_argument("--db", default=None, help="SQLite file for the votes (default: the web chat's feedback.sqlite)")
    s.add_argument("--seed", type=int, default=None, help="seed for drawing the pairs")
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("leaderboard", help="Bradley-Terry ratings of the votes, with 95%% bootstrap intervals, length "
                                           "control and (given judge verdicts) the judge's ratings and agreement")
    add_db(s)
    s.add_argument("--judgments", default=None,
                   help="judgments.jsonl of `llmlab judge pairwise` on the items of `llmlab arena battles`")
    s.add_argument("--boot", type=int, default=200, help="bootstrap resamples")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--json", action="store_true", help="print the report as JSON")
    s.set_defaults(func=cmd_leaderboard)

    s = sub.add_parser("agreement", help="annotator agreement (Cohen, Fleiss, Krippendorff), Dawid-Skene reliability "
                                         "and flagged annotators, for arena votes or a labels file")
    add_db(s)
    s.add_argument("--labels", default=None, help='JSONL of {"item", "annotator", "label"} instead of the votes')
    s.set_defaults(func=cmd_agreement)

    s = sub.add_parser("battles", help="voted battles as `llmlab judge pairwise` items (id = battle id)")
    add_db(s)
    s.add_argument("--out", required=True, help="JSONL of {id, question, answer_a, answer_b, model_a, model_b}")
    s.set_defaults(func=cmd_battles)

    s = sub.add_parser("export", help="votes with a winner as preference pairs, for `llmlab dpo`")
    add_db(s)
    s.add_argument("--pairs", required=True, help='JSONL of {"messages", "chosen", "rejected"}')
    s.set_defaults(func=cmd_export)


def add_db(p):
    p.add_argument("--db", default=None, help="the arena's database (default: the one `llmlab arena serve` uses)")


def db_path(args) -> str:
    from llmlab.serve.feedback import default_db
    return default_db() if args.db is None else args.db


def parse_model(text: str) -> tuple[str, str, bool]:
    """[NAME=]MODEL[:int4] -> (name, model, int4)."""
    name, _, spec = text.rpartition("=")
    int4 = spec.endswith(":int4")
    spec = spec.removesuffix(":int4")
    return name or text, spec, int4


def cmd_serve(args) -> int:
    from llmlab.api import load
    from llmlab.errors import LLMLabError
    from llmlab.serve.app import create_app
    from llmlab.serve.feedback import FeedbackStore
    from llmlab.serve.routes_arena import install_arena
    from llmlab.serve.run import address, bind, uvicorn_server
    from llmlab.serve.state import ServerOptions

    specs = [parse_model(m) for m in args.models]
    names = [n for n, _, _ in specs]
    if len(specs) < 2:
        raise LLMLabError("the arena needs at least two models: --model A --model B")
    if len(set(names)) < len(names):
        raise LLMLabError("two models have the same name; name them: --model NAME=MODEL")
    if args.max_batch < 1 or args.max_len < 1:
        raise LLMLabError("--max-batch and --max-len must be at least 1")
    sock = bind(args.host, args.port)
    db = db_path(args)
    if not db:
        raise LLMLabError("the arena needs a database for its votes (--db FILE)")
    os.makedirs(os.path.dirname(os.path.abspath(db)), exist_ok=True)
    FeedbackStore(db).close()  # an unusable path is one error line now, not a traceback at startup
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    llms = {name: load(spec, dtype=args.dtype, int4=int4) for name, spec, int4 in specs}
    options = ServerOptions(model_name=names[0], max_batch=args.max_batch, max_len=args.max_len, db=db)
    app = create_app(llms[names[0]], options)
    install_arena(app, llms, options, seed=args.seed)
    print(f"llmlab arena of {', '.join(names)} at {address(sock)}/arena; votes -> {db}", flush=True)
    uvicorn_server(app, log_level="info").run(sockets=[sock])
    return 0


def read_jsonl(path) -> list[dict]:
    from llmlab.errors import LLMLabError
    try:
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError) as e:
        raise LLMLabError(f"cannot read {path}: {e}") from None


def cmd_leaderboard(args) -> int:
    from llmlab.eval.arena import arena_report
    from llmlab.eval.judge.ratings import format_leaderboard
    from llmlab.serve.feedback import read_votes

    judgments = read_jsonl(args.judgments) if args.judgments else None
    report = arena_report(read_votes(db_path(args)), judgments, n_boot=args.boot, seed=args.seed)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{report['votes']} votes\n\nPeople (Bradley-Terry, Elo scale):\n" + format_leaderboard(report["human"]))
    style = report["style_controlled"]
    print("\nLength-controlled (logistic regression with the normalized length difference):")
    for r in style["rows"]:
        print(f"  {r['model']:<24} {r['rating']:7.0f}  [{r['ci95'][0]:.0f}, {r['ci95'][1]:.0f}]")
    lo, hi = style["length_coef_ci95"]
    print(f"  length coefficient {style['length_coef']:+.2f} [{lo:+.2f}, {hi:+.2f}]")
    if "judge" in report:
        print("\nLLM judge:\n" + format_leaderboard(report["judge"]))
        ag = report["judge_agreement"]["with_ties"]
        print(f"\njudge vs people on {ag['n']} battles: agreement {ag['agreement']:.2f}, Cohen's kappa "
              f"{ag['kappa']:.2f} [{ag['kappa_ci95'][0]:.2f}, {ag['kappa_ci95'][1]:.2f}]")
    return 0


def cmd_agreement(args) -> int:
    from llmlab.eval.annotators import report
    from llmlab.eval.arena import vote_labels
    from llmlab.errors import LLMLabError
    from llmlab.serve.feedback import read_votes

    if args.labels:
        rows = read_jsonl(args.labels)
        if any(not {"item", "annotator", "label"} <= set(r) for r in rows):
            raise LLMLabError(f'every line of {args.labels} needs "item", "annotator" and "label"')
        triples = [(json.dumps(r["item"]), r["annotator"], r["label"]) for r in rows]
    else:
        triples = vote_labels(read_votes(db_path(args)))
    print(json.dumps(report(triples), indent=2, default=str))
    return 0


def cmd_battles(args) -> int:
    from llmlab.io import atomic_write_text
    from llmlab.serve.feedback import read_votes

    votes = read_votes(db_path(args))
    items = [{"id": v["battle_id"], "question": v["messages"][-1]["content"], "answer_a": v["answer_a"],
              "answer_b": v["answer_b"], "model_a": v["model_a"], "model_b": v["model_b"]} for v in votes]
    atomic_write_text(args.out, "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in items))
    print(f"{len(items)} battles -> {args.out}")
    return 0


def cmd_export(args) -> int:
    from llmlab.serve.feedback import export_arena_pairs

    print(f"{export_arena_pairs(db_path(args), args.pairs)} preference pairs -> {args.pairs}")
    return 0
