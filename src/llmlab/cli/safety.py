"""CLI: `llmlab detect` (does a text look machine-written?) and `llmlab check-grounding` (is an answer supported
by a context?)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from llmlab.client import add_client_args
from llmlab.errors import LLMLabError


def _text_arg(value: str, what: str) -> str:
    text = sys.stdin.read() if value == "-" else value
    if not text.strip():
        raise LLMLabError(f"the {what} is empty")
    return text


def cmd_detect(args) -> int:
    from llmlab.safety.detect import DETECTORS, THRESHOLDS, check_detectors, detection_scores, looks_machine
    names = check_detectors(args.detectors.split(",") if args.detectors else DETECTORS)
    text = _text_arg(args.text, "text")
    from llmlab.api import load
    performer = load(args.model, dtype=args.dtype)
    observer = load(args.observer, dtype=args.dtype) if args.observer else None
    scores = detection_scores([text], performer, observer)[0]
    # the thresholds were chosen for SmolLM2 as its own observer; another model's scores have another scale
    thresholds = THRESHOLDS.get(args.model, {}) if not args.observer else {}
    verdicts = looks_machine(scores, {k: v for k, v in thresholds.items() if k in names})
    if args.json:
        print(json.dumps({"scores": {k: scores[k] for k in names}, "n_tokens": scores["n_tokens"],
                          "thresholds": thresholds, "machine": verdicts}))
        return 0
    for name in names:
        if name in verdicts:
            side = "machine" if verdicts[name] else "human"
            print(f"{name:<11} {scores[name]:8.4f}  threshold {thresholds[name]:g}: looks {side}-written")
        else:
            print(f"{name:<11} {scores[name]:8.4f}  (no calibrated threshold for this model)")
    print(f"({scores['n_tokens']} tokens scored)")
    return 0


def cmd_check_grounding(args) -> int:
    from llmlab.client import client_from_args
    from llmlab.safety.hallucination import check_grounding
    path = Path(args.context)
    if not path.is_file():
        raise LLMLabError(f"context file {path} does not exist")
    context = path.read_text(encoding="utf-8", errors="replace")
    answer = _text_arg(args.answer, "answer")
    result = check_grounding(client_from_args(args), context, answer)
    if args.json:
        print(json.dumps(result))
        return 0
    for c in result["claims"]:
        mark = "supported" if c["support"] >= 0.5 else "NOT supported"
        print(f"{c['support']:.3f}  {mark:<13}  {c['claim']}")
    print(f"overall {result['overall']:.3f}: {result['supported']}/{result['n_claims']} claims supported (P(Yes) >= 0.5)")
    return 0


def add_commands(sub):
    p = sub.add_parser("detect", help="zero-shot AI-text detection with the model itself: log-likelihood, "
                                      "log-rank, entropy, Binoculars")
    p.add_argument("text", help="the text to score, or - to read it from stdin")
    p.add_argument("-m", "--model", default="smollm2", help="the in-process model (performer); default smollm2")
    p.add_argument("--observer", default=None, help="Binoculars' observer model (same tokenizer); default: the "
                                                    "model itself")
    p.add_argument("--detectors", default=None, help="comma-separated: loglik,logrank,entropy,binoculars (all)")
    p.add_argument("--dtype", default="float32", help="float32 | bfloat16")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_detect)

    p = sub.add_parser("check-grounding", help="is each claim of an answer supported by a context? (the model's "
                                               "P(Yes) per sentence)")
    p.add_argument("--context", required=True, help="a text file holding the context")
    p.add_argument("--answer", required=True, help="the answer to check, or - to read it from stdin")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    add_client_args(p)
    p.set_defaults(func=cmd_check_grounding)
