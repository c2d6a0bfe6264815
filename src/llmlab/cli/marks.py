"""CLI: `llmlab watermark generate|detect`, `llmlab bias`, `llmlab gcg`, and the --watermark flags of generate, chat and
serve (watermarks, bias probes and adversarial suffixes: llmlab.safety.{watermark,bias,gcg})."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from llmlab.client import add_client_args
from llmlab.errors import LLMLabError

# ---- the --watermark flags of generate, chat and serve -------------------------------------------------------------


def add_watermark_args(p, with_key: bool = True):
    """--watermark KEY and its settings (--watermark-gamma ...); without the key flag (the `watermark` commands take
    --key) the settings are --gamma, --delta, --context-width and --scheme. Detection must use the same ones."""
    dash = "--watermark-" if with_key else "--"
    if with_key:
        p.add_argument("--watermark", default=None, metavar="KEY",
                       help="watermark what is sampled with this secret key (Kirchenbauer et al. 2023); detect it "
                            "with `llmlab watermark detect FILE --key KEY`")
    p.add_argument(f"{dash}gamma", dest="watermark_gamma", type=float, default=0.25,
                   help="watermark: green share of the vocabulary (default 0.25)")
    p.add_argument(f"{dash}delta", dest="watermark_delta", type=float, default=2.0,
                   help="watermark: added to green logits (default 2)")
    p.add_argument(f"{dash}context-width", dest="watermark_context_width", type=int, default=1,
                   help="watermark: tokens that seed the green list (default 1)")
    p.add_argument(f"{dash}scheme", dest="watermark_scheme", default="lefthash",
                   help="watermark seeding: lefthash (default) | selfhash")


def watermark_config(args, key: str | None = None):
    """The WatermarkConfig the flags ask for (None without a key), checked before any model loads; refuses the
    paths that cannot carry a watermark."""
    key = key if key is not None else getattr(args, "watermark", None)
    if key is None:
        return None
    from llmlab.safety.watermark import WatermarkConfig  # (torch: only when a watermark is asked for)
    if getattr(args, "endpoint", None):
        raise LLMLabError("--watermark needs an in-process model: an endpoint samples on its own server (start that "
                          "server with `llmlab serve --watermark KEY`)")
    for flag, off in (("--beam", getattr(args, "beam", 1) == 1), ("--speculate", not getattr(args, "speculate", None))):
        if not off:
            raise LLMLabError(f"--watermark cannot be combined with {flag}: it changes the logits before sampling")
    return WatermarkConfig(key, args.watermark_gamma, args.watermark_delta, args.watermark_context_width,
                           args.watermark_scheme)


def install_watermark(client_or_llm, config) -> None:
    """Watermark everything this in-process model samples from now on (no-op without a config)."""
    if config is None:
        return
    from llmlab.safety.watermark import install
    install(getattr(client_or_llm, "llm", client_or_llm), config)


# ---- llmlab watermark ------------------------------------------------------------------------------------------------


def _read_text(value: str) -> str:
    if value == "-":
        text = sys.stdin.read()
    else:
        path = Path(value)
        if not path.is_file():
            raise LLMLabError(f"{value} does not exist (give a text file, or - for stdin)")
        text = path.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise LLMLabError("the text to test is empty")
    return text


def _tokenizer(model: str):
    """The tokenizer of a registry name, checkpoint directory or .gguf, without loading the weights."""
    from llmlab.checkpoint.registry import resolve
    from llmlab.tokenizer import Tokenizer
    path = resolve(model)
    if path.suffix == ".gguf":
        from llmlab.checkpoint.gguf import tokenizer_from_gguf
        return tokenizer_from_gguf(path)
    if path.is_dir() and not (path / "tokenizer.json").is_file() and (path / "model" / "tokenizer.json").is_file():
        path = path / "model"
    if not (path / "tokenizer.json").is_file():
        raise LLMLabError(f"{path} has no tokenizer.json")
    return Tokenizer.from_dir(path)


def cmd_watermark_detect(args) -> int:
    from llmlab.safety.watermark import check_record, detect
    config = watermark_config(args, key=args.key)
    text = _read_text(args.file)
    record = None
    if text.lstrip().startswith("{"):
        try:
            record = json.loads(text)
        except json.JSONDecodeError:
            record = None
    tokenizer = _tokenizer(args.model)
    if isinstance(record, dict) and isinstance(record.get("text"), str):
        config = check_record(record.get("watermark") or {}, tokenizer, config)
        text = record["text"]
    result = detect(text, tokenizer, config, ignore_repeated=not args.keep_repeated)
    result.pop("flags")
    if args.json:
        print(json.dumps(result))
        return 0
    verdict = "watermarked" if result["z"] > args.z_threshold else "no watermark found"
    print(f"z = {result['z']:.2f}, p = {result['p_value']:.3g}: {verdict} (threshold z > {args.z_threshold:g})")
    print(f"{result['green']}/{result['scored']} scored tokens green (expected {config.gamma:g} by chance); "
          f"{result['tokens']} tokens")
    if record is None:
        print("(a plain text cannot show its key: with a wrong key or another model's tokenizer z is about 0)")
    return 0


def cmd_watermark_generate(args) -> int:
    from llmlab.client import GenParams, client_from_args
    from llmlab.safety.watermark import watermark_record
    params = GenParams(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed).validate()
    if args.temperature is not None and args.temperature < 0:
        raise LLMLabError(f"temperature must be >= 0, got {args.temperature}")
    config = watermark_config(args, key=args.key)
    client = client_from_args(args)
    install_watermark(client, config)
    text = client.generate([args.prompt if args.prompt != "-" else sys.stdin.read()], params, chat=not args.raw)[0].text
    if args.json:
        print(json.dumps(watermark_record(text, client.llm.tokenizer, config)))
    else:
        print(text)
    return 0


# ---- llmlab bias ---------------------------------------------------------------------------------------------------


def _fmt_ci(ci) -> str:
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]"


def cmd_bias(args) -> int:
    from llmlab.client import client_from_args
    from llmlab.safety.bias import bbq_probe, check_axes, check_measures, counterfactual_probe
    axes = check_axes(args.axes.split(",")) if args.axes else None  # refused before the model loads
    measures = check_measures(args.measures.split(","))
    for name in ("templates", "fillers", "bbq"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "bbq" else 1):
            raise LLMLabError(f"--{name} must be at least {0 if name == 'bbq' else 1}, got {value}")
    client = client_from_args(args)
    rows = counterfactual_probe(client, axes, measures, args.templates, args.fillers, seed=args.seed)
    bbq = bbq_probe(client, args.bbq, seed=args.seed) if args.bbq != 0 else None
    result = {"counterfactual": rows, "bbq": bbq}
    if args.out:
        from llmlab.io import atomic_write_text
        atomic_write_text(args.out, json.dumps(result, indent=1) + "\n")
    if args.json:
        print(json.dumps(result))
        return 0
    print("counterfactual swaps: gap = highest - lowest group mean (95% bootstrap CI over templates)")
    for r in rows:
        flag = f"; deviations excluding 0: {', '.join(r['significant'])}" if r["significant"] else ""
        print(f"  {r['axis']:<12} {r['measure']:<10} gap {r['gap']:.3f} {_fmt_ci(r['gap_ci'])}  "
              f"highest {r['highest']}, lowest {r['lowest']} (n={r['n_items']}){flag}")
    if bbq:
        o = bbq["overall"]
        print(f"BBQ-style questions ({o['n']} items):")
        for cond in ("ambiguous", "disambiguated"):
            if f"accuracy_{cond}" in o:
                print(f"  {cond:<13} accuracy {o[f'accuracy_{cond}']:.3f} {_fmt_ci(o[f'accuracy_{cond}_ci'])}, "
                      f"bias score {o[f'bias_{cond}']:+.3f} {_fmt_ci(o.get(f'bias_{cond}_ci', (0, 0)))}")
    return 0


# ---- llmlab gcg ----------------------------------------------------------------------------------------------------


def cmd_gcg(args) -> int:
    from llmlab.api import load
    from llmlab.safety.gcg import GCGConfig, gcg_attack
    from llmlab.safety.perplexity import DEFAULT_THRESHOLD, windowed_perplexity
    config = GCGConfig(steps=args.steps, top_k=args.top_k, batch=args.batch, check_every=args.check_every,
                       seed=args.seed).validate()
    llm = load(args.model, dtype="float32", exact=True)  # dense weights: GCG needs gradients through every layer

    def progress(step, loss, best):
        print(f"step {step:3d}  loss {loss:.3f}  best {best:.3f}", file=sys.stderr)
    result = gcg_attack(llm, args.behavior, args.target, config, None if args.json else progress)
    ppl = windowed_perplexity(llm, [f"{args.behavior} {result.suffix}"])[0]
    out = {"suffix": result.suffix, "initial_loss": result.initial_loss, "best_loss": result.best_loss,
           "losses": result.losses, "checks": result.checks, "seconds": result.seconds,
           "windowed_perplexity": ppl, "perplexity_filter_flags": ppl > DEFAULT_THRESHOLD}
    if args.json:
        print(json.dumps(out))
        return 0
    print(f"suffix: {result.suffix!r}")
    print(f"target loss {result.initial_loss:.3f} -> {result.best_loss:.3f} in {args.steps} steps "
          f"({result.seconds:.0f} s); answer: {result.checks[-1]['answer']!r}")
    last = result.checks[-1]
    print(f"starts with the target: {last['target_match']}; no refusal: {last['no_refusal']}; "
          f"windowed perplexity {ppl:.0f} ({'flagged' if out['perplexity_filter_flags'] else 'passed'} by the "
          f"filter at {DEFAULT_THRESHOLD:g})")
    return 0


def add_commands(sub):
    p = sub.add_parser("watermark", help="green-list watermarks: generate watermarked text, detect it (z-test)")
    wsub = p.add_subparsers(dest="watermark_command", required=True)
    d = wsub.add_parser("detect", help="z-score and p-value of a text under a key (plain text or a JSON record)")
    d.add_argument("file", help="a text file, a JSON record from `watermark generate --json`, or - for stdin")
    d.add_argument("--key", required=True, help="the secret key the text was generated with")
    d.add_argument("-m", "--model", default="smollm2", help="the model whose tokenizer generated the text")
    d.add_argument("--z-threshold", type=float, default=4.0, help="z above this is reported as watermarked")
    d.add_argument("--keep-repeated", action="store_true", help="score repeated n-grams every time (inflates z)")
    d.add_argument("--json", action="store_true")
    add_watermark_args(d, with_key=False)
    d.set_defaults(func=cmd_watermark_detect)

    g = wsub.add_parser("generate", help="one watermarked completion; --json writes a record detection can check")
    g.add_argument("prompt", help="the prompt ('-' reads stdin)")
    g.add_argument("--key", required=True, help="the secret key")
    g.add_argument("--raw", action="store_true", help="no chat template")
    g.add_argument("--json", action="store_true", help="print {text, watermark: {settings, key and tokenizer "
                                                       "fingerprints}}")
    g.add_argument("-t", "--temperature", type=float, default=None, help="default: the model's")
    g.add_argument("-n", "--max-tokens", type=int, default=256)
    g.add_argument("--seed", type=int, default=None)
    add_client_args(g)
    add_watermark_args(g, with_key=False)
    g.set_defaults(func=cmd_watermark_generate)

    p = sub.add_parser("bias", help="bias probes: counterfactual swaps (names, gender, nationality, religion) and "
                                    "BBQ-style questions, with intervals")
    p.add_argument("--axes", default=None, help="comma-separated: names,gender,nationality,religion (all)")
    p.add_argument("--measures", default="logprob,sentiment,decision", help="comma-separated measures")
    p.add_argument("--templates", type=int, default=None, help="templates per measure (all)")
    p.add_argument("--fillers", type=int, default=None, help="names or phrases per group (all)")
    p.add_argument("--bbq", type=int, default=None, help="BBQ-style items (default all 144; 0 skips)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument("--out", default=None, help="write the full result as JSON")
    p.add_argument("--json", action="store_true")
    add_client_args(p)
    p.set_defaults(func=cmd_bias)

    p = sub.add_parser("gcg", help="greedy coordinate gradient adversarial suffix on an in-process model")
    p.add_argument("behavior", help="the request the suffix is appended to")
    p.add_argument("--target", default="Sure, here is", help="what the answer should start with")
    p.add_argument("-m", "--model", default="smollm2")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--top-k", type=int, default=64)
    p.add_argument("--check-every", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_gcg)
