"""CLI command `llmlab distill`: a student learns a teacher's distribution (token-level KL) or its samples."""

from __future__ import annotations

import json
import sys

from llmlab.cli.train import add_train_flags, train_config_from_args

# a fresh small student learns fast; each step also runs the teacher, so batches stay small
DISTILL_DEFAULTS = dict(lr=1e-3, min_lr=1e-4, warmup_steps=20, max_steps=300, seq_len=256, micro_batch=4,
                        weight_decay=0.0, eval_every=100, save_every=100, out_dir="out_distill")


def cmd_distill(args) -> int:
    from llmlab.train.distill import distill
    summary = distill(args.teacher, args.data, train_config_from_args(args), student_config=args.student_config,
                      student=args.student, mode=args.mode, temperature=args.temperature,
                      sample_tokens=args.answer_tokens, sample_temperature=args.answer_temperature,
                      resume=args.resume)
    if summary["interrupted"]:
        return 130
    before, after = summary["before"], summary["after"]
    print(f"distilled {summary['steps']} steps ({summary['student_params']:,} student parameters, "
          f"{summary['seconds']:.0f} s): held-out KL {before['val_kl']:.3f} -> {after['val_kl']:.3f}, top-1 agreement "
          f"with the teacher {before['val_agreement']:.1%} -> {after['val_agreement']:.1%}; wrote {summary['path']}")
    if args.acceptance_prompts:
        from llmlab.train.distill import draft_acceptance, load_examples
        prompts = [ids for ids, _ in load_examples(args.data, summary["tokenizer"], prompts_only=True)]
        report = draft_acceptance(summary["teacher"], summary["tokenizer"], summary["model"],
                                  prompts[-args.acceptance_prompts:])
        print("as a greedy draft for the teacher: " + json.dumps(report), file=sys.stderr)
    return 0


def add_commands(subparsers):
    p = subparsers.add_parser("distill", help="distill a teacher into a (small) student: token-level KL or the "
                                              "teacher's samples; e.g. a draft model for --speculate draft:PATH")
    p.add_argument("--teacher", required=True, help="registry name, checkpoint directory or .gguf file")
    p.add_argument("--student-config", default=None,
                   help="a fresh student: a preset (tiny, small, 30m, medium) or a config.json; the teacher's "
                        "vocabulary, context and special tokens")
    p.add_argument("--student", default=None, help="start from this checkpoint instead (same tokenizer)")
    p.add_argument("--data", required=True, help="JSONL of {'messages'}, {'prompt'} or {'text'}, or a text file")
    p.add_argument("--mode", choices=["kl", "seq"], default="kl",
                   help="kl: forward KL to the teacher's next-token distribution on the data's tokens; seq: learn "
                        "the teacher's answers to the data's prompts")
    p.add_argument("--temperature", type=float, default=1.0, help="softens both distributions in the KL")
    p.add_argument("--answer-tokens", type=int, default=128, help="seq: tokens per teacher answer")
    p.add_argument("--answer-temperature", type=float, default=0.7, help="seq: the teacher's sampling temperature")
    p.add_argument("--acceptance-prompts", type=int, default=0,
                   help="after training, the student's acceptance as a greedy draft on the data's last N prompts")
    p.add_argument("--resume", action="store_true", help="continue the run in --out-dir from its latest checkpoint")
    add_train_flags(p)
    p.set_defaults(func=cmd_distill, **DISTILL_DEFAULTS)
