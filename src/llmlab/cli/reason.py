"""CLI: `llmlab reason`: a test-time strategy over a task's questions (accuracy, tokens, time), or a sweep."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

from llmlab.client import add_client_args
from llmlab.errors import LLMLabError

# flag -> the strategy option it sets (given only when the flag is); -k sets the strategy's size option
OPTION_FLAGS = {"temperature": "--temperature", "shots": "--shots", "weighted": "--weighted", "scorer": "--scorer",
                "budget": "--budget", "beam": "--beam", "rounds": "--rounds", "threshold": "--threshold",
                "strong_k": "--strong-k", "max_steps": "--max-steps", "step_tokens": "--step-tokens"}


def strategy_options(args) -> dict:
    """The options given on the command line, each checked to apply to the chosen strategy."""
    from llmlab.reason.run import SIZE_OPTION, strategy_fn
    fn = strategy_fn(args.strategy)
    accepted = set(inspect.signature(fn).parameters)
    options = {k: getattr(args, k) for k in OPTION_FLAGS if getattr(args, k) not in (None, False)}
    if args.k is not None:
        if args.strategy not in SIZE_OPTION or SIZE_OPTION[args.strategy] == "rounds":
            raise LLMLabError(f"-k does not apply to strategy {args.strategy!r} (it samples no k candidates)")
        if args.k <= 0:
            raise LLMLabError(f"-k must be at least 1, got {args.k}")
        options[SIZE_OPTION[args.strategy]] = args.k
    tree_or_steps = "step_tokens" in accepted
    if not tree_or_steps:
        options["max_tokens"] = args.max_tokens
    for key in options:
        if key not in accepted:
            raise LLMLabError(f"{OPTION_FLAGS.get(key, key)} does not apply to strategy {args.strategy!r}")
    budget, per_sample = options.get("budget"), options.get("step_tokens", 48) if tree_or_steps else args.max_tokens
    if budget is not None and budget < per_sample:
        raise LLMLabError(f"a budget of {budget} generated tokens is too small for one sample of up to "
                          f"{per_sample} tokens (raise --budget or lower --max-tokens)")
    for prefix, what in (("reward:", "reward model"), ("prm:", "process reward model")):
        if args.scorer and args.scorer.startswith(prefix) and not Path(args.scorer[len(prefix):]).is_dir():
            raise LLMLabError(f"no {what} directory at {args.scorer[len(prefix):]}")
    return options


def parse_sizes(text: str) -> list[int]:
    try:
        sizes = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise LLMLabError(f"--sweep takes comma-separated integers, got {text!r}") from None
    if not sizes:
        raise LLMLabError("--sweep needs at least one size")
    return sizes


def cmd_reason(args) -> int:
    from llmlab.client import client_from_args
    from llmlab.reason.run import evaluate, sweep
    from llmlab.reason.tasks import make_items
    if args.questions < 1:
        raise LLMLabError(f"--questions must be at least 1, got {args.questions}")
    if args.max_tokens < 1:
        raise LLMLabError(f"--max-tokens must be at least 1, got {args.max_tokens}")
    options = strategy_options(args)
    sizes = parse_sizes(args.sweep) if args.sweep else None
    if sizes:
        from llmlab.reason.run import SIZE_OPTION
        if args.strategy not in SIZE_OPTION:
            raise LLMLabError(f"--sweep varies a strategy's size; {args.strategy!r} has none")
    items = make_items(args.task, args.questions, args.seed)  # a bad task is refused before the model loads
    two_models = bool(args.strong_model or args.strong_endpoint)
    if two_models and args.strategy not in ("router", "debate"):
        raise LLMLabError(f"--strong-model/--strong-endpoint apply to router and debate, not {args.strategy!r}")
    client = client_from_args(args)
    strong = client_from_args(args, "strong") if two_models else None
    if sizes:
        from llmlab.io import atomic_write_text
        from llmlab.reason.run import SIZE_OPTION, frontier_plot
        rows = sweep(args.strategy, client, items, sizes, strong=strong, seed=args.seed, **options)
        size = SIZE_OPTION[args.strategy]
        out = Path(args.out or "runs/reason")
        out.mkdir(parents=True, exist_ok=True)
        lines = [f"| {size} | accuracy | generated tokens/question | prompt tokens/question | seconds/question |",
                 "|---|---|---|---|---|"]
        for r in rows:
            print(f"{args.strategy} {size}={r[size]}: accuracy {r['accuracy']:.3f}, {r['completion_tokens']:.0f} "
                  f"generated tokens/question, {r['seconds']:.1f} s/question")
            lines.append(f"| {r[size]} | {r['accuracy']:.3f} | {r['completion_tokens']:.0f} | {r['prompt_tokens']:.0f} "
                         f"| {r['seconds']:.2f} |")
        atomic_write_text(out / "sweep.json", json.dumps({"task": args.task, "rows": rows}, indent=2) + "\n")
        atomic_write_text(out / "sweep.md", f"`llmlab reason --strategy {args.strategy}` on {args.task} "
                                            f"({len(items)} questions)\n\n" + "\n".join(lines) + "\n")
        frontier_plot(out / "sweep.png", {args.strategy: [(r["completion_tokens"], r["accuracy"]) for r in rows]},
                      f"{args.strategy} on {args.task}")
        print(f"wrote {out}/sweep.{{md,json,png}}")
        return 0
    s = evaluate(args.strategy, client, items, strong=strong, seed=args.seed, **options)
    print(f"{args.strategy} on {args.task} ({s['questions']} questions, {client.name}): accuracy {s['accuracy']:.3f}, "
          f"{s['completion_tokens']:.0f} generated + {s['prompt_tokens']:.0f} prompt tokens/question, "
          f"{s['seconds']:.2f} s/question")
    if args.out:
        from llmlab.io import atomic_write_text
        Path(args.out).mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(args.out) / "results.json", json.dumps(s, indent=2) + "\n")
        print(f"wrote {Path(args.out) / 'results.json'}")
    return 0


def add_commands(sub):
    from llmlab.reason.run import STRATEGIES
    p = sub.add_parser("reason", help="test-time compute: chain of thought, self-consistency, best-of-N, tree "
                                      "search, revision, routing, debate; accuracy, tokens and time")
    p.add_argument("--strategy", default="self-consistency", help=f"one of {', '.join(STRATEGIES)}")
    p.add_argument("--task", default="arithmetic", help="arithmetic, arithmetic1, arithmetic3, word_problems, add, "
                                                       "count_letters, sort_list, bios, a JSONL of question/answer, or an "
                                                       "lm-eval task YAML (PATH.yaml[#FILTER], local data)")
    p.add_argument("-k", type=int, default=None, help="samples (self-consistency, router), candidates (best-of-n), "
                                                      "breadth (tree)")
    p.add_argument("--questions", type=int, default=20, help="how many questions")
    p.add_argument("--seed", type=int, default=0, help="seeds the questions and the sampling")
    p.add_argument("--max-tokens", type=int, default=256, help="most generated tokens per sample")
    p.add_argument("--temperature", type=float, default=None, help="sampling temperature (strategy default)")
    p.add_argument("--shots", type=int, default=None, help="worked examples before the question (few-shot CoT)")
    p.add_argument("--weighted", action="store_true", help="self-consistency: vote weighted by sample probability")
    p.add_argument("--scorer", default=None,
                   help="best-of-n, tree: verifier | likelihood | value | reward:DIR | prm:DIR")
    p.add_argument("--budget", type=int, default=None, help="most generated tokens per question")
    p.add_argument("--beam", type=int, default=None, help="tree: partial solutions kept per step")
    p.add_argument("--max-steps", type=int, default=None, help="tree: most reasoning steps (lines)")
    p.add_argument("--step-tokens", type=int, default=None, help="tree: most tokens per step")
    p.add_argument("--rounds", type=int, default=None, help="revise: critique/revise rounds; debate: rounds")
    p.add_argument("--threshold", type=float, default=None, help="router: agreement needed to keep the cheap answer")
    p.add_argument("--strong-k", type=int, default=None, help="router: samples of the strong model")
    p.add_argument("--sweep", default=None, help="comma-separated sizes (-k values, or rounds) to sweep")
    p.add_argument("--out", default=None, help="directory for results.json, or the sweep's table and plot "
                                               "(default runs/reason for a sweep)")
    add_client_args(p)
    add_client_args(p, prefix="strong")
    p.set_defaults(func=cmd_reason)
