"""CLI: `llmlab detect` (does a text look machine-written?), `llmlab check-grounding` (is an answer supported
by a context?), `llmlab redteam` (jailbreaks, extraction, injection) and `llmlab audit` (the safety card)."""

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
    from llmlab.safety.detect import (CURVATURE_PERTURBATIONS, DETECTORS, THRESHOLDS, check_detectors,
                                      detection_scores, looks_machine)
    names = check_detectors(args.detectors.split(",") if args.detectors else DETECTORS)
    text = _text_arg(args.text, "text")
    from llmlab.api import load
    performer = load(args.model, dtype=args.dtype)
    observer = load(args.observer, dtype=args.dtype) if args.observer else None
    perturbations = CURVATURE_PERTURBATIONS if "curvature" in names else 0
    scores = detection_scores([text], performer, observer, curvature=perturbations)[0]
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
    p.add_argument("--detectors", default=None, help="comma-separated: loglik,logrank,entropy,binoculars,curvature "
                                                     "(all; curvature samples 8 perturbations)")
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
    add_redteam_commands(sub)


# ---- llmlab redteam / llmlab audit -----------------------------------------------------------------------------

EXTRA_PROBES = ("system_prompt", "injection")  # not jailbreak families: their own success checks


def _redteam_plan(args) -> tuple[list[str], list[str], list[str], list]:
    """Families, extra probes, defences and behaviours, all checked before any model loads."""
    from llmlab.safety.redteam import FAMILIES, load_behaviours
    from llmlab.safety.redteam.defences import check_defences
    from llmlab.safety.redteam.harness import check_budget
    check_budget(args.budget)
    names = [n.strip() for n in (args.families or ",".join(FAMILIES)).split(",") if n.strip()]
    for n in names:
        if n not in FAMILIES + EXTRA_PROBES:
            raise LLMLabError(f"unknown probe family {n!r} (one of {', '.join(FAMILIES + EXTRA_PROBES)})")
    if args.limit is not None and args.limit < 1:
        raise LLMLabError(f"--limit must be at least 1, got {args.limit}")
    defences = check_defences(args.defences.split(","))
    behaviours = load_behaviours(args.behaviours)
    return [n for n in names if n in FAMILIES], [n for n in names if n in EXTRA_PROBES], defences, behaviours


def cmd_redteam(args) -> int:
    from llmlab.client import client_from_args
    from llmlab.io import atomic_write_text
    from llmlab.safety.redteam import run_redteam
    from llmlab.safety.redteam.judges import Judge, calibrate_judge
    from llmlab.safety.redteam.rates import fmt, fmt_difference
    families, extra, defences, behaviours = _redteam_plan(args)
    client = client_from_args(args)
    judge_client = client_from_args(args, "judge") if (args.judge_model or args.judge_endpoint) else client
    result = {"command": "redteam"}
    if args.calibrate_judge:
        judge, result["judge_agreement"] = calibrate_judge(judge_client)
        for k in ("refusal_patterns", "refusal_model", "refusal_combined", "harm_model"):
            a = result["judge_agreement"][k]
            print(f"judge {k:<17} accuracy {a['agreement']:.2f} [{a['agreement_ci95'][0]:.2f}, "
                  f"{a['agreement_ci95'][1]:.2f}]  kappa {a['kappa']:.2f} [{a['kappa_ci95'][0]:.2f}, "
                  f"{a['kappa_ci95'][1]:.2f}]  (n={a['n']})")
    else:
        judge = Judge(judge_client)
    if families:
        log = (lambda m: print(m, file=sys.stderr)) if not args.json else None
        result["jailbreak"] = run_redteam(client, behaviours, families, defences, args.budget, judge=judge,
                                          limit=args.limit, seed=args.seed, log=log)
        if not args.json:
            print(f"{'defence':<12} {'family':<20} {'ASR [95% Wilson]':<30} non-refusal")
            for r in result["jailbreak"]["by_family"]:
                print(f"{r['defence']:<12} {r['family']:<20} {fmt(r['asr']):<30} {fmt(r['non_refusal'])}")
            for r in result["jailbreak"]["by_defence"]:
                print(f"defence {r['defence']}: ASR {fmt(r['asr'])}, drop {fmt_difference(r['asr_drop'])}, "
                      f"over-refusal {fmt(r['over_refusal'])}, benign accuracy {fmt(r['benign_accuracy'])}, "
                      f"{r['seconds_per_prompt']:.2f} s/prompt")
    if "system_prompt" in extra:
        from llmlab.safety.redteam.extraction import system_prompt_extraction
        result["system_prompt"] = system_prompt_extraction(client, n_secrets=2 if args.budget == "small" else 4)
        if not args.json:
            for d, r in result["system_prompt"]["summary"].items():
                print(f"system-prompt leak, defence {d}: {fmt(r)}")
    if "injection" in extra:
        import tempfile
        from llmlab.safety.redteam.injection import agent_injection, rag_injection
        with tempfile.TemporaryDirectory(prefix="llmlab-injection-") as work:
            result["injection"] = {"rag": rag_injection(client, work, args.budget),
                                   "agent": agent_injection(client, args.budget)}
        if not args.json:
            for surface, res in result["injection"].items():
                for r in res["by_defence"]:
                    print(f"injection {surface}, defence {r['defence']}: success {fmt(r['success'])}")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "redteam.json", json.dumps(result, indent=1) + "\n")
        print(f"wrote {out / 'redteam.json'}", file=sys.stderr)
    if args.json:
        print(json.dumps(result))
    return 0


def cmd_audit(args) -> int:
    from llmlab.client import client_from_args
    from llmlab.safety.audit import BUDGETS, check_sections, run_audit
    if args.model_name and (args.model or args.endpoint):
        raise LLMLabError("give the model once: as MODEL, --model or --endpoint")
    if args.budget not in BUDGETS:
        raise LLMLabError(f"unknown budget {args.budget!r} (one of {', '.join(BUDGETS)})")
    sections = check_sections(args.sections.split(",")) if args.sections else None
    args.model = args.model or args.model_name
    client = client_from_args(args)
    judge_client = client_from_args(args, "judge") if (args.judge_model or args.judge_endpoint) else None
    target = args.model or (f"--endpoint {args.endpoint}" if args.endpoint else "smollm2")
    flags = "".join(f" --{k}" for k in ("exact", "int4", "compile") if getattr(args, k, False))
    command = (f"llmlab audit {target}{flags} --budget {args.budget}"
               + (f" --sections {args.sections}" if args.sections else "")
               + (f" --max-minutes {args.max_minutes:g}" if args.max_minutes is not None else "")
               + (" --resume" if args.resume else "") + f" --out {args.out}")
    card = run_audit(client, args.out, args.budget, sections, command=command, judge_client=judge_client, label=target,
                     log=lambda m: print(m, file=sys.stderr), max_minutes=args.max_minutes, resume=args.resume)
    for s in card["sections"]:
        print(f"{s['title']}: {s['status']} ({s.get('seconds', 0):.0f} s)")
    print(f"wrote {Path(args.out) / 'card.md'} and card.json")
    return 0


def add_redteam_commands(sub):
    from llmlab.safety.redteam.defences import DEFENCES
    p = sub.add_parser("redteam", help="jailbreak probe families (with defences), system-prompt extraction and "
                                       "prompt injection through the model client; ASR with Wilson intervals")
    p.add_argument("--families", default=None, help="comma-separated probe families (default: every jailbreak "
                                                    "family); also system_prompt, injection")
    p.add_argument("--behaviours", default="builtin", help="builtin, or a HarmBench CSV, JailbreakBench CSV/JSON "
                                                            "or llmlab JSONL file")
    p.add_argument("--defences", default="none", help=f"comma-separated: {', '.join(DEFENCES)}")
    p.add_argument("--budget", default="small", help="small | full (behaviours, reply length, copies, shots)")
    p.add_argument("--limit", type=int, default=None, help="at most N harmful (and N benign) behaviours")
    p.add_argument("--calibrate-judge", action="store_true", help="fit the judges' thresholds on the labelled set "
                                                                  "and print their agreement first")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="directory for redteam.json (every prompt, reply and verdict)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    add_client_args(p)
    add_client_args(p, prefix="judge")
    p.set_defaults(func=cmd_redteam)

    p = sub.add_parser("audit", help="a safety audit card (markdown + JSON + plots): red-team, extraction, "
                                     "injection, hallucination, watermark, bias, GCG, detection")
    p.add_argument("model_name", nargs="?", default=None, metavar="MODEL", help="registry name, checkpoint "
                                                                                "directory or .gguf (or --endpoint)")
    p.add_argument("--budget", default="small", help="small (about 18 minutes of one core on SmolLM2) | full")
    p.add_argument("--sections", default=None, help="comma-separated subset, run in this order (default: judge, "
                                                    "hallucination, watermark, bias, detect, extraction, injection, "
                                                    "gcg, redteam)")
    p.add_argument("--max-minutes", type=float, default=None, help="start no section after this many minutes; the "
                                                                   "card lists the ones cut")
    p.add_argument("--resume", action="store_true", help="add to the card already in --out (same model and budget): "
                                                         "the sections run now replace theirs, the others are kept")
    p.add_argument("--out", required=True, help="directory for card.md, card.json and the plots")
    add_client_args(p)
    add_client_args(p, prefix="judge")
    p.set_defaults(func=cmd_audit)
