"""CLI: `llmlab eval TASK...|niah|contamination|order` and `llmlab judge pointwise|pairwise|geval|winrate|ratings|agreement`."""

from __future__ import annotations

from pathlib import Path

from llmlab.client import add_client_args
from llmlab.errors import LLMLabError

SPECIAL = ("niah", "contamination", "order", "list")


def _client(args, prefix: str = ""):
    from llmlab.client import client_from_args
    return client_from_args(args, prefix, logprobs=not getattr(args, "no_logprobs", False))


def _read_jsonl(path) -> list[dict]:
    from llmlab.eval.tasks import read_jsonl
    return read_jsonl(Path(path))


# ---- llmlab eval ----------------------------------------------------------------------------------------------


def cmd_eval(args) -> int:
    from llmlab.eval.builtin import names
    first = args.tasks[0]
    if first == "list":
        print("built-in tasks: " + ", ".join(names()))
        return 0
    out = Path(args.out)
    if first == "niah":
        from llmlab.eval.niah import format_niah, run_niah
        s = run_niah(_client(args), lengths=[int(x) for x in args.lengths.split(",")],
                     depths=[float(x) for x in args.depths.split(",")], out_dir=out / "niah")
        print(format_niah(s))
        print(f"wrote {out / 'niah'}/{{items.jsonl,summary.json,heatmap.png}}")
        return 0
    if first in ("contamination", "order"):
        from llmlab.eval.tasks import load_task
        if len(args.tasks) < 2:
            raise LLMLabError(f"llmlab eval {first} TASK: name a task")
        task = load_task(args.tasks[1])
        items = task.load_items()[:args.limit] if args.limit else task.load_items()
        client = _client(args)
        if first == "contamination":
            from llmlab.eval.contamination import check_contamination, item_text
            s = check_contamination(client, [item_text(it) for it in items], args.threshold, out / task.name)
            print(f"{task.name}: {s['flagged']}/{s['n']} items flagged (fuzzy >= {s['threshold']}); mean exact "
                  f"{s['mean_exact']:.3f}, mean fuzzy {s['mean_fuzzy']:.3f}")
        else:
            if task.type != "multiple_choice":
                raise LLMLabError(f"{task.name} is a {task.type} task; order sensitivity needs multiple choice")
            from llmlab.eval.order import order_sensitivity
            q = "question" if "question" in items[0] else None
            if q is None:
                raise LLMLabError(f"{task.name}: order sensitivity needs a 'question' field in the items")
            ctx = "biography" if "biography" in items[0] else None
            s = order_sensitivity(client, items, choices_field=task.choices, gold_field=task.gold,
                                  context_field=ctx, out_dir=out / task.name)
            print(f"{task.name}: accuracy per rotation {[round(a, 3) for a in s['accuracy_per_rotation']]}, "
                  f"spread {s['accuracy_spread']:.3f}; chosen letter unchanged under rotation "
                  f"{s['same_letter_rate']:.1%} of items, chosen content unchanged {s['same_content_rate']:.1%}; "
                  f"letters {s['letter_counts']}")
        return 0
    from llmlab.eval.report import write_eval_report
    from llmlab.eval.tasks import format_summary, load_task, run_task
    tasks = [load_task(t) for t in args.tasks]  # every task file is checked before the model loads
    client = _client(args)
    summaries = []
    for task in tasks:
        s = run_task(task, client, out, limit=args.limit)
        summaries.append(s)
        print(format_summary(s))
    path = write_eval_report(summaries, out)
    print(f"wrote {out}/<task>/{{items.jsonl,summary.json}} and {path}")
    return 0


# ---- llmlab judge ---------------------------------------------------------------------------------------------


def _judge(args):
    from llmlab.eval.judge import Judge
    return Judge(_client(args, "judge"), rubric=args.rubric, temperature=args.temperature,
                 max_tokens=args.max_tokens, seed=args.seed, samples=args.samples,
                 force_verdict=not getattr(args, "no_force_verdict", False))


def _print_result(res) -> None:
    from llmlab.eval.judge.selfreport import format_self_report
    print(format_self_report(res["report"]))


def cmd_judge(args) -> int:
    from llmlab.eval.judge import run
    judge = _judge(args)
    out = Path(args.out)
    common = dict(out_dir=out, repeat=not args.no_repeat)
    if args.action in ("pointwise", "pairwise", "geval"):
        items = _read_jsonl(args.items)
        kw = {}
        if args.action == "pointwise":
            kw["domain"] = args.domain
        if args.action == "geval":
            if not args.criterion:
                raise LLMLabError("llmlab judge geval needs --criterion TEXT")
            kw.update(criterion=args.criterion, criterion_name=args.criterion_name)
        res = run.run_judge(judge, args.action, items, verbosity=args.verbosity_probe,
                            self_model=args.self_model, **common, **kw)
        scores = [r["score"] for r in res["records"] if r.get("score") is not None]
        if scores:
            print(f"mean score {sum(scores) / len(scores):.2f} over {len(scores)} parsed items")
        _print_result(res)
    elif args.action == "winrate":
        questions = [p["question"] for p in _read_jsonl(args.prompts)]
        answers = _answers(args.answers, args.candidate, questions, args)
        baseline = _answers(args.baseline, args.baseline_model, questions, args)
        res = run.win_rate(judge, questions, answers, baseline, verbosity=args.verbosity_probe, **common)
        w = res["win_rate"]
        if w["win_rate"] is None:
            print(f"no verdict could be parsed ({w['parse_failures']} of {w['n']} pairs): no win rate")
            _print_result(res)
            return 1
        print(f"win rate {w['win_rate']:.3f} (95% CI {w['win_rate_ci95'][0]:.3f}-{w['win_rate_ci95'][1]:.3f}), "
              f"length-controlled {w['lc_win_rate']:.3f}; {w['wins']}W/{w['ties']}T/{w['losses']}L, "
              f"{w['parse_failures']} unparsed, {w['forced']} with a forced verdict")
        _print_result(res)
    elif args.action == "ratings":
        from llmlab.eval.judge.ratings import battles_from_records, format_leaderboard, leaderboard
        if args.judgments:
            rows = leaderboard(battles_from_records(_read_jsonl(args.judgments)))
            print(format_leaderboard(rows))
            return 0
        questions = [p["question"] for p in _read_jsonl(args.prompts)]
        answers = {}
        for spec in args.answers_of or []:
            name, _, path = spec.partition("=")
            if not path:
                raise LLMLabError(f"--answers-of takes NAME=FILE.jsonl, got {spec!r}")
            answers[name] = [a["answer"] for a in _read_jsonl(path)][:len(questions)]
        if len(answers) < 2:
            raise LLMLabError("ratings need at least two models (--answers-of NAME=FILE twice or more)")
        res = run.ratings(judge, questions, answers, **common)
        if res["leaderboard"] is None:
            print("no verdict could be parsed: no ratings")
            _print_result(res)
            return 1
        print(format_leaderboard(res["leaderboard"]))
        _print_result(res)
    elif args.action == "agreement":
        res = run.human_agreement(judge, args.pairs, **common)
        a = res["agreement"]
        for k in ("with_ties", "without_ties"):
            x = a[k]
            if x["agreement"] is None:
                print(f"{k}: no items")
                continue
            print(f"{k}: agreement {x['agreement']:.3f} (95% CI {x['agreement_ci95'][0]:.3f}-"
                  f"{x['agreement_ci95'][1]:.3f}), Cohen's kappa {x['kappa']:.3f} over {x['n']} items")
        _print_result(res)
    print(f"wrote {out}")
    return 0


def _answers(path, model, questions, args) -> list[str]:
    if path:
        answers = [a["answer"] for a in _read_jsonl(path)]
        if len(answers) < len(questions):
            raise LLMLabError(f"{path} has {len(answers)} answers for {len(questions)} prompts")
        return answers[:len(questions)]
    if model:
        from llmlab.client import connect
        from llmlab.eval.judge.run import generate_answers
        return generate_answers(connect(model=model), questions, max_tokens=args.answer_tokens)
    raise LLMLabError("give the answers as a JSONL file or a model to generate them")


FORCED_HELP = ("Forced verdicts (on by default): when the judge explains but writes no [[...]] marker, its own "
               "transcript is continued with the marker and the verdict is the allowed one (1-10, or A/B/C) it "
               "finds most likely. Such judgments are marked verdict_source=logprob (parsed ones: parsed) and "
               "the self-report counts both. Through an endpoint this needs /v1/completions with echo and "
               "logprobs and the chat template at /tokenizer_info (llmlab serve has both); otherwise they stay "
               "parse failures.")


def add_commands(subparsers):
    p = subparsers.add_parser("eval", help="evaluate a model on tasks (YAML files or built-in), niah, "
                                           "contamination, order sensitivity")
    p.add_argument("tasks", nargs="+", help="task YAML files or built-in names; or: list | niah | contamination "
                                            "TASK | order TASK")
    add_client_args(p)
    p.add_argument("--limit", type=int, default=None, help="first N items of each task")
    p.add_argument("--out", default="eval_out", help="output directory (a rerun resumes from it)")
    p.add_argument("--lengths", default="256,512,1024", help="niah: context lengths in tokens")
    p.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="niah: needle depths in [0, 1]")
    p.add_argument("--threshold", type=float, default=0.8, help="contamination: flag fuzzy overlap at or above")
    p.set_defaults(func=cmd_eval)

    j = subparsers.add_parser("judge", help="LLM-as-a-judge with a self-report on the judge's reliability",
                              description=FORCED_HELP)
    jsub = j.add_subparsers(dest="action", required=True)
    for action, help_ in [("pointwise", "1-10 score per answer (items: question, answer[, reference])"),
                          ("pairwise", "A, B or tie in both orders (items: question, answer_a, answer_b)"),
                          ("geval", "G-Eval: judge-written evaluation steps, then a 1-5 score"),
                          ("winrate", "win rate and length-controlled win rate against a baseline"),
                          ("ratings", "Bradley-Terry leaderboard of several models"),
                          ("agreement", "agreement with human labels from a pairs file")]:
        s = jsub.add_parser(action, help=help_, description=help_ if action == "geval" else f"{help_}. {FORCED_HELP}")
        add_client_args(s, "judge")
        if action != "geval":
            s.add_argument("--no-force-verdict", action="store_true",
                           help="count a judgment without its [[...]] marker as a parse failure instead of forcing "
                                "the verdict from the judge's log-probabilities")
        s.add_argument("--no-logprobs", action="store_true",
                       help="the judge endpoint returns no log-probabilities (or must not be asked): G-Eval "
                            "averages samples, verdicts are never forced")
        s.add_argument("--rubric", default=None, help="YAML rubric: name, criteria, scores")
        s.add_argument("--temperature", type=float, default=0.0)
        s.add_argument("--max-tokens", type=int, default=256, help="judge output length")
        s.add_argument("--seed", type=int, default=0)
        s.add_argument("--samples", type=int, default=5, help="geval without logprobs: samples per item")
        s.add_argument("--out", default="judge_out")
        s.add_argument("--no-repeat", action="store_true", help="skip the repeated run (no repeat agreement)")
        s.add_argument("--verbosity-probe", action="store_true", help="also judge answers against padded copies")
        s.add_argument("--self-model", default=None, help="pairwise: the judge's own model name (self-preference)")
        if action in ("pointwise", "pairwise", "geval"):
            s.add_argument("--items", required=True, help="JSONL of items to judge")
        if action == "pointwise":
            s.add_argument("--domain", default="general", choices=["general", "coding", "math"])
        if action == "geval":
            s.add_argument("--criterion", default=None, help="what to evaluate, e.g. 'Coherence: ...'")
            s.add_argument("--criterion-name", default="Score")
        if action in ("winrate", "ratings"):
            s.add_argument("--prompts", default=None, help="JSONL with a 'question' per line")
            s.add_argument("--answer-tokens", type=int, default=256)
        if action == "winrate":
            s.add_argument("--answers", default=None, help="JSONL with the model's 'answer' per prompt")
            s.add_argument("--baseline", default=None, help="JSONL with the baseline's 'answer' per prompt")
            s.add_argument("--candidate", default=None, help="generate the answers with this model instead")
            s.add_argument("--baseline-model", default=None, help="generate the baseline answers with this model")
        if action == "ratings":
            s.add_argument("--answers-of", action="append", help="NAME=FILE.jsonl (repeat per model)")
            s.add_argument("--judgments", default=None, help="rate from an existing pairwise judgments.jsonl")
        if action == "agreement":
            s.add_argument("--pairs", required=True, help="JSONL: question, answer_a, answer_b, label (A|B|tie)")
        s.set_defaults(func=cmd_judge)
