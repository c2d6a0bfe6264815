"""CLI command `llmlab speedrun`: corpus, tokenizer, pretraining, evaluation, SFT, DPO and a report in one run
directory."""

from __future__ import annotations

import argparse


def cmd_speedrun(args) -> int:
    from llmlab.speedrun import speedrun

    overrides = dict(people=args.people, seed=args.seed, max_steps=args.steps, vocab_size=args.vocab_size,
                     sft_steps=args.sft_steps, dpo_steps=args.dpo_steps, time_budget=args.time_budget,
                     threads=args.threads, progress=args.progress)
    out = args.out or ("runs/speedrun" if args.preset == "default" else f"runs/speedrun-{args.preset}")
    report = speedrun(out, preset=args.preset, force=args.force, **overrides)
    print(f"report: {report}")
    return 0


def add_commands(subparsers):
    from llmlab.speedrun import PRESETS

    p = subparsers.add_parser("speedrun", help="build the bios corpus, train a tokenizer, pretrain, evaluate, SFT "
                              "and DPO on bios QA, and write a report (default: at most 15 minutes on a 2-core CPU)")
    p.add_argument("--preset", choices=list(PRESETS), default="default",
                   help="default (<= 15 min), tiny (~4 min) or ci (well under a minute, for tests)")
    p.add_argument("--out", default=None, help="run directory (default runs/speedrun, runs/speedrun-PRESET for the others); "
                   "must be empty")
    p.add_argument("--force", action="store_true", help="replace a non-empty run directory")
    p.add_argument("--people", type=int, default=None, help="people in the bios world (overrides the preset)")
    p.add_argument("--steps", type=int, default=None, help="most pretraining steps (overrides the preset)")
    p.add_argument("--sft-steps", type=int, default=None, help="SFT steps (overrides the preset)")
    p.add_argument("--dpo-steps", type=int, default=None, help="DPO steps (overrides the preset)")
    p.add_argument("--vocab-size", type=int, default=None, help="tokenizer vocabulary (overrides the preset)")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds for the whole run; fewer steps are trained if a trial step says they would not "
                        "fit (0: no budget; default from the preset)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: 1 or all cores, whichever trained faster in timed trial steps)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help="progress bar while pretraining")
    p.set_defaults(func=cmd_speedrun)
