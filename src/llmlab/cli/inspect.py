"""CLI: `llmlab inspect attention|lens|probe|trace|steer|attribute` (thin wrappers over llmlab.inspect.reports)."""

from __future__ import annotations

import json
from pathlib import Path

from llmlab.errors import LLMLabError


def _ints(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise LLMLabError(f"expected comma-separated integers, got {text!r}") from None


def _load(args):
    import torch

    from llmlab.api import load
    # dense weights (attribution and probes need gradients and hooks), always: nothing to announce
    return load(args.model, dtype=torch.float32, exact=True, announce=False)


def _lines(path: str) -> list[dict]:
    p = Path(path)
    if not p.is_file():
        raise LLMLabError(f"{path} does not exist")
    rows = []
    for n, line in enumerate(p.read_text().splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise LLMLabError(f"{path}:{n} is not valid JSON") from None
    return rows


def _attention(args, llm):
    from llmlab.inspect.reports import attention_report
    return attention_report(llm, args.prompt, Path(args.out), _ints(args.layers))


def _lens(args, llm):
    from llmlab.inspect.reports import lens_report
    texts = [r["text"] for r in _lines(args.tuned_texts)] if args.tuned_texts else None
    return lens_report(llm, args.prompt, Path(args.out), texts, args.tuned_steps)


def _probe(args, llm):
    from llmlab.inspect.reports import probe_report
    if (args.data is None) == (args.bios is None):
        raise LLMLabError("give exactly one of --data FILE.jsonl or --bios ATTRIBUTE")
    if args.bios:
        from llmlab.data.bios import make_bios_world
        world = make_bios_world(args.people, seed=args.world_seed)
        return probe_report(llm, Path(args.out), world=world, attribute=args.bios, layers=_ints(args.layers))
    rows = _lines(args.data)
    if not all(isinstance(r, dict) and "text" in r and "label" in r for r in rows):
        raise LLMLabError(f"every line of {args.data} needs a \"text\" and a \"label\"")
    return probe_report(llm, Path(args.out), [r["text"] for r in rows], [str(r["label"]) for r in rows],
                        layers=_ints(args.layers))


def _trace(args, llm):
    from llmlab.inspect.reports import trace_report
    return trace_report(llm, args.prompt, args.subject, args.answer, Path(args.out), args.samples, args.seed)


def _steer(args, llm):
    from llmlab.inspect.reports import steer_report
    return steer_report(llm, args.prompt, args.positive, args.negative, args.layer, args.strength or [-4, 0, 4],
                        args.token, Path(args.out), args.max_tokens)


def _attribute(args, llm):
    from llmlab.inspect.reports import attribute_report
    return attribute_report(llm, args.prompt, args.target, Path(args.out), args.baseline)


def _run(args) -> int:
    if getattr(args, "prompt", "x") is not None and not getattr(args, "prompt", "x").strip():
        raise LLMLabError("the prompt is empty")
    llm = _load(args)
    summary = args.tool(args, llm)
    print(json.dumps(summary, ensure_ascii=False))
    print(f"wrote {args.out}")
    return 0


def add_commands(sub):
    p = sub.add_parser("inspect", help="interpretability: attention, logit/tuned lens, probes, tracing, steering")
    tools = p.add_subparsers(dest="tool_name", required=True)

    def tool(name, fn, help, prompt=True):
        t = tools.add_parser(name, help=help)
        t.add_argument("-m", "--model", default="smollm2", help="registry name, checkpoint directory or .gguf file")
        t.add_argument("--out", default=f"runs/inspect/{name}", help="directory for the PNG and JSON")
        if prompt:
            t.add_argument("--prompt", required=True, help="raw text (no chat template)")
        t.set_defaults(func=_run, tool=fn)
        return t

    t = tool("attention", _attention, "attention weights per layer and head (PNG grid + JSON)")
    t.add_argument("--layers", help="comma-separated layers (default: all)")
    t = tool("lens", _lens, "logit lens per layer and position; with --tuned-texts, a tuned lens and its KL")
    t.add_argument("--tuned-texts", help="JSONL with {\"text\": ...} per line to train a tuned lens (80/20 split)")
    t.add_argument("--tuned-steps", type=int, default=100)
    t = tool("probe", _probe, "linear probes by layer with a control task", prompt=False)
    t.add_argument("--data", help="JSONL with {\"text\", \"label\"}: probe the last token of each text")
    t.add_argument("--bios", help="probe a bios-world attribute at each person's name (birth_year, birth_city, ...)")
    t.add_argument("--people", type=int, default=200, help="bios world size (as the model was trained on)")
    t.add_argument("--world-seed", type=int, default=0, help="bios world seed (as the model was trained on)")
    t.add_argument("--layers", help="comma-separated residual states (default: all)")
    t = tool("trace", _trace, "causal tracing: corrupt the subject, restore one state (heatmap)")
    t.add_argument("--subject", required=True, help="the subject as it appears in the prompt")
    t.add_argument("--answer", required=True, help="the correct next token, e.g. ' Paris'")
    t.add_argument("--samples", type=int, default=8, help="noise samples")
    t.add_argument("--seed", type=int, default=0)
    t = tool("steer", _steer, "steering vector from contrasting prompts, its effect on chosen tokens")
    t.add_argument("--positive", action="append", required=True, help="a prompt of the wanted side (repeatable)")
    t.add_argument("--negative", action="append", required=True, help="its contrasting prompt (repeatable)")
    t.add_argument("--layer", type=int, required=True, help="residual state to add the vector to")
    t.add_argument("--strength", type=float, action="append", help="repeatable (default -4, 0, 4)")
    t.add_argument("--token", action="append", required=True, help="a next token to measure (repeatable)")
    t.add_argument("-n", "--max-tokens", type=int, default=0, help="also generate this many tokens per strength")
    t = tool("attribute", _attribute, "gradient x input and occlusion for one next-token prediction")
    t.add_argument("--target", help="the predicted token to explain (default: the model's top token)")
    t.add_argument("--baseline", help="occlusion's replacement token (default: end-of-text)")
