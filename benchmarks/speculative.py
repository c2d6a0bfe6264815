"""Speculative decoding against plain decoding on SmolLM2-135M, greedy, batch 1, in one run.

    python benchmarks/speculative.py [--drafts lookup,self,draft:PATH] [--per-kind 2] [--new-tokens 128]
                                     [--rounds 2] [--draft-tokens 7] [--int4 | --exact]
    python benchmarks/speculative.py --write-distill-data runs/distill_prompts.jsonl [--n 400]

Task kinds: input-grounded ones (summarise a passage, extract from it, rewrite code, answer from a passage; the
passages are docstrings and functions of Python's standard library, so nothing is downloaded) and open-ended ones.
For every draft kind and prompt, plain greedy (Engine.generate) and speculative greedy alternate over rounds in the
same process and the best round of each counts. One SpeculativeDecoder per draft kind serves all its prompts, as in
`llmlab serve --speculate`, with auto-off on. The target is llmlab.load's default (the native 4-bit decode step on
the Q4_1 file), or --int4 / --exact; "self" always verifies with the fp32 model (--exact: a packed model has no
higher precision to verify with) and its plain rows are fp32 decoding too. Auto-off: a request whose drafting loses falls back to plain steps.
Prints tokens/s, the ratio end to end and of the decode phase alone (the prompt's prefill, the same work both ways,
timed alone and taken off both), acceptance and tokens per verify step per prompt, then the mean ratios per task kind and
draft kind; reports whether the outputs are the same tokens (they may part at a near-tie of two logits); writes
benchmarks/results/speculative.json. Targets: >= 1.5x on input-grounded tasks, never below 0.95x on open-ended ones.
Run it on a quiet machine.

--write-distill-data writes prompts of the same kinds from other passages (none of the benchmark's), as JSONL
{"prompt"} for `llmlab distill --mode seq|kl` to make a draft model for SmolLM2.
"""

from __future__ import annotations

import argparse
import ast
import json
import random
import time
from pathlib import Path

import torch

import llmlab
from llmlab.data.pystdlib import stdlib_dir
from llmlab.engine import SamplingParams
from llmlab.engine.speculative import DRAFT_TOKENS, SpeculativeDecoder
from llmlab.io import atomic_write_text

RESULTS = Path(__file__).parent / "results" / "speculative.json"
MODULES = ["json/__init__.py", "textwrap.py", "shutil.py", "pathlib/__init__.py", "pathlib.py", "csv.py",
           "functools.py", "heapq.py", "bisect.py", "statistics.py", "fractions.py", "difflib.py", "string.py",
           "calendar.py", "random.py", "glob.py", "fnmatch.py", "base64.py", "uuid.py", "tempfile.py",
           "argparse.py", "logging/__init__.py", "collections/__init__.py", "dataclasses.py", "enum.py",
           "ipaddress.py", "gzip.py", "zipfile/__init__.py", "zipfile.py", "configparser.py", "datetime.py"]
GROUNDED = {
    "summarise": "Summarise this documentation in two sentences:\n\n{doc}",
    "extract": "{doc}\n\nList every parameter or option named in the text above, one per line, with what it does.",
    "rewrite code": "Rewrite this Python function with clearer variable names and a docstring, keeping its "
                    "logic:\n\n{code}",
    "answer": "{doc}\n\nAnswer from the text above only: what does it return, and when does it raise an error?",
}
OPEN_ENDED = ["Write a short story about a robot who learns to paint.",
              "Explain why the sky is blue to a ten-year-old.",
              "Give three tips for a first job interview.",
              "Write a poem about the sea at night.",
              "What are the pros and cons of working from home?",
              "Describe a perfect Sunday morning.",
              "Invent a new board game and explain its rules.",
              "Why do cats purr? Explain briefly."]


def passages() -> tuple[list[str], list[str]]:
    """(docstrings of 200-1200 characters, function sources of 5-25 lines) from the modules above, in a fixed order."""
    docs, code = [], []
    root = stdlib_dir()
    for name in MODULES:
        path = root / name
        if not path.is_file():
            continue
        text = path.read_text(encoding="utf-8")
        for node in ast.walk(ast.parse(text)):
            if not isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                continue
            doc = ast.get_docstring(node)
            if doc and 200 <= len(doc) <= 1200:
                docs.append(f"{node.name}: {doc}")
            if isinstance(node, ast.FunctionDef) and 5 <= node.end_lineno - node.lineno <= 25:
                source = ast.get_source_segment(text, node)
                if source and len(source) < 1200:
                    code.append(source)
    return docs, code


def task_prompts(per_kind: int, offset: int, seed: int) -> dict[str, list[str]]:
    """per_kind prompts of each grounded kind (passages from `offset` in a seeded order) and of open-ended ones."""
    docs, code = passages()
    rng = random.Random(seed)
    rng.shuffle(docs)
    rng.shuffle(code)
    out = {}
    for i, (kind, template) in enumerate(GROUNDED.items()):
        pool = code if "{code}" in template else docs
        picked = [pool[(offset + i * per_kind + j) % len(pool)] for j in range(per_kind)]
        out[kind] = [template.format(doc=p, code=p) for p in picked]
    out["open-ended"] = [OPEN_ENDED[(offset + j) % len(OPEN_ENDED)] for j in range(per_kind)]
    return out


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def run_prompt(llm, decoder: SpeculativeDecoder, prompt: str, params: SamplingParams, rounds: int) -> dict:
    """Both ways end to end (prompt prefill included, as a user waits for it), and their decode phases alone: both
    prefill the same prompt the same way, so the prefill (timed alone in the same round) is taken off both."""
    ids = llm.prompt_ids(prompt)
    best_plain = best_spec = best_prefill = float("inf")
    for _ in range(rounds):  # alternate, so a change in machine load hits both
        _, t_prefill = timed(lambda: llm.engine.prefill(ids))
        plain, t_plain = timed(lambda: llm.engine.generate([ids], params)[0])
        spec, t_spec = timed(lambda: decoder.generate(ids, params))
        best_plain, best_spec, best_prefill = min(best_plain, t_plain), min(best_spec, t_spec), min(best_prefill, t_prefill)
    stats = decoder.last
    n = spec.completion_tokens
    # a verify forward of k + 1 tokens rounds differently from a one-token step: at a near-tie the texts may part
    same = spec.token_ids == plain.token_ids
    decode_plain, decode_spec = max(best_plain - best_prefill, 1e-9), max(best_spec - best_prefill, 1e-9)
    return dict(prompt=prompt[:60], tokens=n, prompt_tokens=len(ids), prefill_s=best_prefill,
                plain_tok_s=plain.completion_tokens / best_plain, speculative_tok_s=n / best_spec,
                ratio=(n / best_spec) / (plain.completion_tokens / best_plain),
                decode_ratio=(n / decode_spec) / (plain.completion_tokens / decode_plain),
                acceptance=stats.acceptance_rate, tokens_per_step=stats.tokens_per_step,
                turned_off=bool(stats.turned_off), same_tokens=same)


def write_distill_data(path: str, n: int):
    """n prompts of every kind from passages the benchmark does not use (its offset is 0, these start at 1000)."""
    per_kind = max(1, n // (len(GROUNDED) + 1))
    prompts = task_prompts(per_kind, offset=1000, seed=1)
    open_ended = [f"{q} (Answer {i + 1})" if i >= len(OPEN_ENDED) else q
                  for i, q in enumerate(OPEN_ENDED * (per_kind // len(OPEN_ENDED) + 1))][:per_kind]
    prompts["open-ended"] = open_ended
    records = [{"prompt": p, "kind": k} for k, ps in prompts.items() for p in ps]
    random.Random(0).shuffle(records)
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))
    print(f"wrote {len(records)} prompts to {path}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--drafts", default="lookup,self", help="comma-separated: lookup, self, draft:PATH")
    ap.add_argument("--per-kind", type=int, default=2, help="prompts per task kind")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--draft-tokens", type=int, default=DRAFT_TOKENS, help="the most drafts per verify step")
    ap.add_argument("--int4", action="store_true", help="the target decodes with PyTorch's 4-bit weight copies")
    ap.add_argument("--exact", action="store_true", help="the target decodes in fp32 eager")
    ap.add_argument("--out", default=str(RESULTS), help="where the JSON results go")
    ap.add_argument("--write-distill-data", metavar="FILE", help="write distillation prompts instead (see above)")
    ap.add_argument("--n", type=int, default=400, help="with --write-distill-data: how many prompts")
    args = ap.parse_args()
    if args.write_distill_data:
        return write_distill_data(args.write_distill_data, args.n)
    targets = {}

    def target(draft: str):
        kind = "exact" if args.exact or draft == "self" else "int4" if args.int4 else "default"
        if kind not in targets:
            targets[kind] = llmlab.load("smollm2", dtype=torch.float32, int4=kind == "int4", exact=kind == "exact")
        return kind, targets[kind]

    params = SamplingParams(temperature=0, max_new_tokens=args.new_tokens)
    prompts = task_prompts(args.per_kind, offset=0, seed=0)
    rows = []
    print(f"{'draft':<8} {'kind':<13} {'prompt':<34} {'plain':>6} {'spec':>6} {'ratio':>6} {'decode':>6} "
          f"{'accept':>6} {'tok/step':>8} off same")
    for draft in args.drafts.split(","):
        target_kind, llm = target(draft)
        decoder = SpeculativeDecoder(llm.engine, draft, args.draft_tokens)
        for kind, kind_prompts in prompts.items():
            for prompt in kind_prompts:
                row = dict(draft=draft, target=target_kind, kind=kind,
                           **run_prompt(llm, decoder, prompt, params, args.rounds))
                rows.append(row)
                print(f"{draft[:8]:<8} {kind:<13} {row['prompt'][:34].replace(chr(10), ' '):<34} "
                      f"{row['plain_tok_s']:6.1f} {row['speculative_tok_s']:6.1f} {row['ratio']:6.2f} "
                      f"{row['decode_ratio']:6.2f} "
                      f"{row['acceptance']:6.0%} {row['tokens_per_step']:8.2f} {row['turned_off']!s:<3} "
                      f"{row['same_tokens']}", flush=True)
    summary = []
    for draft in args.drafts.split(","):
        for group, kinds in (("input-grounded", list(GROUNDED)), ("open-ended", ["open-ended"])):
            for kind in kinds + ([] if group == "open-ended" else [None]):
                picked = [r for r in rows if r["draft"] == draft
                          and (r["kind"] == kind if kind else r["kind"] in kinds)]
                if not picked:
                    continue
                ratios, decode = [r["ratio"] for r in picked], [r["decode_ratio"] for r in picked]
                accept = sum(r["acceptance"] for r in picked) / len(picked)
                line = dict(draft=draft, kind=kind or f"all {group}", mean_ratio=sum(ratios) / len(ratios),
                            min_ratio=min(ratios), mean_decode_ratio=sum(decode) / len(decode),
                            min_decode_ratio=min(decode), acceptance=accept)
                summary.append(line)
                print(f"{draft}: {line['kind']:<20} speed-up {line['mean_ratio']:.2f}x (min {line['min_ratio']:.2f}x), "
                      f"decode phase {line['mean_decode_ratio']:.2f}x (min {line['min_decode_ratio']:.2f}x), "
                      f"acceptance {accept:.0%}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(dict(int4=args.int4, exact=args.exact, draft_tokens=args.draft_tokens,
                                               rounds=args.rounds,
                                               new_tokens=args.new_tokens, cpu=_cpu_name(),
                                               threads=torch.get_num_threads(),
                                               summary=summary, rows=rows), indent=1))


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


if __name__ == "__main__":
    main()
