"""Prefill and decode speed on SmolLM2-135M: llmlab against transformers (and llama-cpp-python when installed).

    python benchmarks/decode.py [--prompt-tokens 128] [--new-tokens 128] [--rounds 2]

Every engine runs in its own fresh process (so peak memory is its own), on the same weights (the SmolLM2 Q4_1
GGUF, dequantized by each; "llmlab int4" also re-packs the 4-bit layers for decoding, llmlab.model.quant) and the
same 128-token prompt, greedy, batch 1; the engines alternate over rounds and the best round counts. Prints a table with ratios and writes benchmarks/results/decode.json.
Run it on a quiet machine: on 2 cores, any other busy process halves everything.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

TEXT = ("The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined "
        "movable metal type, oil-based ink and a screw press adapted from wine making. Books became cheaper, "
        "literacy spread, and ideas travelled faster than ever before across Europe. ") * 8
RESULTS = Path(__file__).parent / "results" / "decode.json"


def prompt_ids(tokenizer, n: int) -> list[int]:
    ids = tokenizer.encode(TEXT)
    assert len(ids) >= n, "TEXT too short"
    return ids[:n]


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(fn, repeat=3):
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


# ---- workers: each prints one JSON line ------------------------------------------------------------------------


def run_llmlab(gguf, n_prompt, n_new, dtype, compile, int4=False):
    import torch
    from llmlab.checkpoint.gguf import load_gguf
    from llmlab.engine import Engine, SamplingParams
    from llmlab.model.quant import quantize_int4

    torch.set_grad_enabled(False)
    model, tok, _ = load_gguf(gguf, dtype=getattr(torch, dtype))
    if int4:
        quantize_int4(model)
    engine = Engine(model, tok, compile=compile)
    ids = prompt_ids(tok, n_prompt)
    params = SamplingParams(max_new_tokens=n_new, temperature=0, ignore_eos=True)
    t0 = time.perf_counter()
    engine.generate([ids], SamplingParams(max_new_tokens=4, temperature=0, ignore_eos=True))  # warm-up/compile
    warmup = time.perf_counter() - t0
    prefill = timed(lambda: engine.prefill(ids))
    total = timed(lambda: engine.generate([ids], params), repeat=2)
    out = engine.generate([ids], params)[0].token_ids
    return dict(prefill_s=prefill, decode_s=total - prefill, warmup_s=warmup, tokens=out)


def run_transformers(gguf, n_prompt, n_new, dtype):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_grad_enabled(False)
    gguf = Path(gguf)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=getattr(torch, dtype)).eval()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    ids = torch.tensor([prompt_ids(tok, n_prompt)])
    gen = dict(do_sample=False, pad_token_id=tok.eos_token_id)
    model.generate(ids, max_new_tokens=4, min_new_tokens=4, **gen)  # warm-up
    prefill = timed(lambda: model.generate(ids, max_new_tokens=1, min_new_tokens=1, **gen))
    total = timed(lambda: model.generate(ids, max_new_tokens=n_new, min_new_tokens=n_new, **gen), repeat=2)
    out = model.generate(ids, max_new_tokens=n_new, min_new_tokens=n_new, **gen)[0, ids.shape[1]:].tolist()
    return dict(prefill_s=prefill, decode_s=total - prefill, warmup_s=0.0, tokens=out)


def run_llama_cpp(gguf, n_prompt, n_new):
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), n_ctx=512, n_threads=os.cpu_count(), verbose=False)
    from llmlab.checkpoint.gguf import tokenizer_from_gguf
    ids = prompt_ids(tokenizer_from_gguf(gguf), n_prompt)
    no_eos = {llm.token_eos(): -1e9}

    def complete(n):
        llm.reset()
        return llm.create_completion(ids, max_tokens=n, temperature=0.0, logit_bias=no_eos)

    complete(4)
    prefill = timed(lambda: complete(1))
    total = timed(lambda: complete(n_new), repeat=2)
    return dict(prefill_s=prefill, decode_s=total - prefill, warmup_s=0.0, tokens=None)


ENGINES = {
    "llmlab int4 compiled": lambda a: run_llmlab(a.gguf, a.prompt_tokens, a.new_tokens, "bfloat16", True, True),
    "llmlab bf16 compiled": lambda a: run_llmlab(a.gguf, a.prompt_tokens, a.new_tokens, "bfloat16", True),
    "llmlab fp32 eager": lambda a: run_llmlab(a.gguf, a.prompt_tokens, a.new_tokens, "float32", False),
    "transformers fp32": lambda a: run_transformers(a.gguf, a.prompt_tokens, a.new_tokens, "float32"),
    "transformers bf16": lambda a: run_transformers(a.gguf, a.prompt_tokens, a.new_tokens, "bfloat16"),
    "llama-cpp-python Q4_1": lambda a: run_llama_cpp(a.gguf, a.prompt_tokens, a.new_tokens),
}


def available(name: str) -> bool:
    if name.startswith("llama-cpp"):
        import importlib.util
        return importlib.util.find_spec("llama_cpp") is not None
    return True


def busy_cores() -> float:
    return os.getloadavg()[0]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--engines", default=",".join(ENGINES), help="comma-separated subset of: " + ", ".join(ENGINES))
    ap.add_argument("--gguf", default=None, help="GGUF file (default: the smollm2 registry model)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        result = ENGINES[args.worker](args)
        result["peak_rss_mib"] = peak_rss_mib()
        print("RESULT " + json.dumps(result))
        return

    if args.gguf is None:
        from llmlab.checkpoint.registry import resolve
        args.gguf = str(resolve("smollm2"))
    names = [n for n in args.engines.split(",") if n in ENGINES and available(n)]
    print(f"load average before start: {busy_cores():.2f} (want ~0 on a quiet machine)", file=sys.stderr)
    runs: dict[str, list[dict]] = {n: [] for n in names}
    for r in range(args.rounds):
        for name in names:  # alternate engines so drift in machine load hits all of them
            cmd = [sys.executable, __file__, "--worker", name, "--gguf", args.gguf,
                   "--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens)]
            p = subprocess.run(cmd, capture_output=True, text=True)
            line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                print(f"{name}: failed\n{p.stderr[-2000:]}", file=sys.stderr)
                continue
            res = json.loads(line[7:])
            runs[name].append(res)
            print(f"round {r + 1} {name}: prefill {args.prompt_tokens / res['prefill_s']:.0f} tok/s, "
                  f"decode {(args.new_tokens - 1) / res['decode_s']:.1f} tok/s", file=sys.stderr)

    table = {}
    for name, rs in runs.items():
        if not rs:
            continue
        best_prefill = min(x["prefill_s"] for x in rs)
        best_decode = min(x["decode_s"] for x in rs)
        table[name] = dict(prefill_tok_s=args.prompt_tokens / best_prefill,
                           decode_tok_s=(args.new_tokens - 1) / best_decode,
                           peak_rss_mib=max(x["peak_rss_mib"] for x in rs), warmup_s=min(x["warmup_s"] for x in rs),
                           tokens=rs[0]["tokens"])
    ref = table.get("transformers fp32")
    print(f"\nSmolLM2-135M, {args.prompt_tokens}-token prompt, {args.new_tokens} new tokens, batch 1, greedy, "
          f"{os.cpu_count()} cores\n")
    print("| engine | prefill tok/s | decode tok/s | decode vs transformers fp32 | peak RSS MiB | warm-up s |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, row in table.items():
        ratio = f"{row['decode_tok_s'] / ref['decode_tok_s']:.2f}x" if ref else "-"
        print(f"| {name} | {row['prefill_tok_s']:.0f} | {row['decode_tok_s']:.1f} | {ratio} | "
              f"{row['peak_rss_mib']:.0f} | {row['warmup_s']:.1f} |")
    hf_bf16, lcpp = table.get("transformers bf16"), table.get("llama-cpp-python Q4_1")
    ratios = {}
    for name, ours in table.items():
        if not name.startswith("llmlab"):
            continue
        if ref:
            ratios[f"{name}: decode vs transformers fp32"] = ours["decode_tok_s"] / ref["decode_tok_s"]
        if hf_bf16:
            ratios[f"{name}: decode vs transformers bf16"] = ours["decode_tok_s"] / hf_bf16["decode_tok_s"]
            ratios[f"{name}: prefill vs transformers bf16"] = ours["prefill_tok_s"] / hf_bf16["prefill_tok_s"]
        if lcpp:
            ratios[f"{name}: decode vs llama-cpp-python"] = ours["decode_tok_s"] / lcpp["decode_tok_s"]
            ratios[f"{name}: prefill vs llama-cpp-python"] = ours["prefill_tok_s"] / lcpp["prefill_tok_s"]
        if ref and ours["tokens"] and ref["tokens"]:
            same = sum(a == b for a, b in zip(ours["tokens"], ref["tokens"]))
            ratios[f"{name}: greedy tokens equal to transformers fp32"] = f"{same}/{len(ref['tokens'])}"
    print()
    for k, v in ratios.items():
        print(f"{k}: {v:.2f}" if isinstance(v, float) else f"{k}: {v}")
    RESULTS.parent.mkdir(exist_ok=True)
    out = dict(prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens, cores=os.cpu_count(),
               engines={k: {kk: vv for kk, vv in v.items() if kk != "tokens"} for k, v in table.items()},
               ratios=ratios, load_average_at_start=busy_cores())
    tmp = RESULTS.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(out, indent=2) + "\n")
    os.replace(tmp, RESULTS)
    print(f"\nwritten {RESULTS}")


if __name__ == "__main__":
    main()
