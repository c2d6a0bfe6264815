"""Prefill and decode speed on SmolLM2-135M: llmlab's paths against transformers and llama.cpp's llama-bench.

    python benchmarks/decode.py [--prompt-tokens 128] [--new-tokens 128] [--rounds 2] [--threads 2]

Every engine runs in its own fresh process (so peak memory and start-up are its own), on the same file (the
SmolLM2 Q4_1 GGUF), the same 128-token prompt, greedy, batch 1; the engines alternate over rounds and the best
round counts. "llmlab default" is `llmlab.load(FILE)` with no options (the native 4-bit kernel on the file's
own weights), "llmlab lite" the same kernel in a process without PyTorch (`llmlab generate`'s default path,
llmlab.engine.native.lite), "llmlab default sampled" the same with temperature 0.7 and top-p 0.9 (not by default), "llmlab exact" is
fp32 eager, "llmlab int4 compiled" the PyTorch 4-bit copies under torch.compile;
llama-bench (`-p 128 -n 128 -d 0,128 -t THREADS`, built by benchmarks/build_llamacpp.sh; its decode measured after
128 tokens of context, as the others decode after the prompt) runs when built. `--prompt-tokens 2048` compares
decoding at a long context (KV cache reads: llmlab's native step keeps an fp16 cache, as llama.cpp does). Start-up is
the time from a fresh process to the first generated tokens: cold in round 1 (empty native-build and inductor
caches), warm afterwards. Prints a table with ratios (to llama-bench when present) and writes
benchmarks/results/decode.json. Run it on a quiet machine: on 2 cores, any other busy process halves everything.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TEXT = ("The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined "
        "movable metal type, oil-based ink and a screw press adapted from wine making. Books became cheaper, "
        "literacy spread, and ideas travelled faster than ever before across Europe. ") * 64
RESULTS = Path(__file__).parent / "results" / "decode.json"


def prompt_ids(tokenizer, n: int) -> list[int]:
    ids = tokenizer.encode(TEXT)
    if len(ids) < n:
        raise SystemExit(f"--prompt-tokens {n} is more than the benchmark's text holds ({len(ids)} tokens)")
    return ids[:n]


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> bool:
    """Restart this process's high-water mark (Linux: /proc/self/clear_refs), so VmHWM measures from here on."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def hwm_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def timed(fn, repeat=3):
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


# ---- workers: each prints one JSON line ------------------------------------------------------------------------


LLMLAB_MODES = {"default": {}, "exact": {"exact": True}, "int4 compiled": {"int4": True, "compile": True,
                                                                              "dtype": "bfloat16"}}


def run_llmlab(gguf, n_prompt, n_new, mode, sampled=False):
    """sampled: temperature 0.7 and top-p 0.9 (a chat's sampling, which llama-bench's figure leaves out) instead of
    greedy."""
    t_start = time.perf_counter()
    import torch

    import llmlab
    from llmlab.engine import SamplingParams

    torch.set_grad_enabled(False)
    llm = llmlab.load(gguf, **LLMLAB_MODES[mode])
    engine = llm.engine
    ids = prompt_ids(llm.tokenizer, n_prompt)
    options = dict(temperature=0.7, top_p=0.9, seed=0) if sampled else dict(temperature=0)
    params = SamplingParams(max_new_tokens=n_new, ignore_eos=True, **options)
    engine.generate([ids], SamplingParams(max_new_tokens=4, temperature=0, ignore_eos=True))  # warm-up/compile
    start = time.perf_counter() - t_start  # a fresh process to its first tokens: import, load, build/compile
    # from here on: the peak while prefilling and decoding, without loading's transients (VmHWM restarts from the
    # current RSS, so all that loading left resident counts); llama-bench's figure is its whole run's peak
    decode_rss = reset_peak_rss()
    prefill = timed(lambda: engine.prefill(ids))
    total = timed(lambda: engine.generate([ids], params), repeat=2)
    out = engine.generate([ids], params)[0].token_ids
    return dict(prefill_s=prefill, decode_s=total - prefill, start_s=start, tokens=None if sampled else out,
                decode_rss_mib=hwm_mib() if decode_rss else None)


def run_llmlab_lite(gguf, n_prompt, n_new):
    """`llmlab generate`'s path: the same kernel with no PyTorch in the process (llmlab.engine.native.lite)."""
    t_start = time.perf_counter()
    from llmlab.engine.native.lite import LiteModel

    model = LiteModel(gguf)
    ids = prompt_ids(model.tokenizer, n_prompt)
    params = model.params(max_new_tokens=n_new, temperature=0, ignore_eos=True)
    list(model.tokens(ids, model.params(max_new_tokens=4, temperature=0, ignore_eos=True)))  # warm-up
    start = time.perf_counter() - t_start
    decode_rss = reset_peak_rss()
    model.new_cache(n_prompt + n_new)
    prefill = timed(lambda: model.prefill(ids))
    total = timed(lambda: list(model.tokens(ids, params)), repeat=2)
    out = list(model.tokens(ids, params))
    assert "torch" not in sys.modules
    return dict(prefill_s=prefill, decode_s=total - prefill, start_s=start, tokens=out,
                decode_rss_mib=hwm_mib() if decode_rss else None)


def run_llmlab_fp32_activations(a):
    """The default path with the native kernel's int8 (decode) and bf16 (prompt) activations off: fp32 throughout
    (decode.cpp reads $LLMLAB_NATIVE_INT8 and $LLMLAB_NATIVE_BF16 at load)."""
    os.environ["LLMLAB_NATIVE_INT8"] = "0"
    os.environ["LLMLAB_NATIVE_BF16"] = "0"
    return run_llmlab(a.gguf, a.prompt_tokens, a.new_tokens, "default")


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
    return dict(prefill_s=prefill, decode_s=total - prefill, start_s=None, tokens=out)


def run_llama_bench(gguf, n_prompt, n_new, threads):
    sys.path.insert(0, str(Path(__file__).parent))
    from llamacpp import bench

    result = bench(gguf, n_prompt, n_new, threads, depth=n_prompt)  # decode after the prompt, as the others do
    # llama-bench reports rates; as times they fit the table (decode: n_new - 1 tokens as for the others)
    return dict(prefill_s=n_prompt / result["prefill_tok_s"], decode_s=(n_new - 1) / result["decode_tok_s"],
                start_s=None, tokens=None, cpu_info=result.get("cpu_info"),
                child_peak_rss_mib=resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)


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
    return dict(prefill_s=prefill, decode_s=total - prefill, start_s=None, tokens=None)


ENGINES = {
    "llmlab default": lambda a: run_llmlab(a.gguf, a.prompt_tokens, a.new_tokens, "default"),
    "llmlab lite": lambda a: run_llmlab_lite(a.gguf, a.prompt_tokens, a.new_tokens),
    "llmlab exact": lambda a: run_llmlab(a.gguf, a.prompt_tokens, a.new_tokens, "exact"),
    "llmlab default fp32 activations": run_llmlab_fp32_activations,  # A/B for the int8 kernels (not by default)
    "llmlab default sampled": lambda a: run_llmlab(a.gguf, a.prompt_tokens, a.new_tokens, "default", sampled=True),
    "llmlab int4 compiled": lambda a: run_llmlab(a.gguf, a.prompt_tokens, a.new_tokens, "int4 compiled"),
    "transformers fp32": lambda a: run_transformers(a.gguf, a.prompt_tokens, a.new_tokens, "float32"),
    "llama-bench": lambda a: run_llama_bench(a.gguf, a.prompt_tokens, a.new_tokens, a.threads),
    "llama-cpp-python Q4_1": lambda a: run_llama_cpp(a.gguf, a.prompt_tokens, a.new_tokens),
}
DEFAULT_ENGINES = "llmlab default,llmlab lite,llmlab exact,llmlab int4 compiled,transformers fp32,llama-bench"


def available(name: str) -> bool:
    if name.startswith("llama-cpp"):
        import importlib.util
        return importlib.util.find_spec("llama_cpp") is not None
    if name == "llama-bench":
        return tool_exists("llama-bench")
    return True


def tool_exists(name: str) -> bool:
    sys.path.insert(0, str(Path(__file__).parent))
    from llamacpp import bin_dir
    return (bin_dir() / name).is_file()


def busy_cores() -> float:
    return os.getloadavg()[0]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2, help="threads for every engine (llama-bench -t, torch)")
    ap.add_argument("--engines", default=DEFAULT_ENGINES, help="comma-separated subset of: " + ", ".join(ENGINES))
    ap.add_argument("--gguf", default=None, help="GGUF file (default: the smollm2 registry model)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        result = ENGINES[args.worker](args)
        result["peak_rss_mib"] = result.pop("child_peak_rss_mib", None) or peak_rss_mib()
        print("RESULT " + json.dumps(result))
        return

    if args.gguf is None:
        from llmlab.checkpoint.registry import resolve
        args.gguf = str(resolve("smollm2"))
    names = [n for n in args.engines.split(",") if n in ENGINES and available(n)]
    load_at_start = busy_cores()
    print(f"load average before start: {load_at_start:.2f} (want ~0 on a quiet machine)", file=sys.stderr)
    runs: dict[str, list[dict]] = {n: [] for n in names}
    cold: dict[str, float] = {}
    for r in range(args.rounds):
        for name in names:  # alternate engines so drift in machine load hits all of them
            cmd = [sys.executable, __file__, "--worker", name, "--gguf", args.gguf, "--threads", str(args.threads),
                   "--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens)]
            env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
            with tempfile.TemporaryDirectory() as fresh:
                if r == 0:  # cold start: no native build, no inductor cache yet
                    env.update(LLMLAB_NATIVE_CACHE=f"{fresh}/native", TORCHINDUCTOR_CACHE_DIR=f"{fresh}/inductor")
                p = subprocess.run(cmd, capture_output=True, text=True, env=env)
            line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                print(f"{name}: failed\n{p.stderr[-2000:]}", file=sys.stderr)
                continue
            res = json.loads(line[7:])
            if r == 0:  # its start-up is the cold one; its speeds count like any round's
                cold[name] = res["start_s"]
                res = {**res, "start_s": None}
            runs[name].append(res)
            print(f"round {r + 1} {name}: prefill {args.prompt_tokens / res['prefill_s']:.0f} tok/s, "
                  f"decode {(args.new_tokens - 1) / res['decode_s']:.1f} tok/s", file=sys.stderr)

    if not any(runs.values()):  # nothing measured: keep the results already written
        raise SystemExit("every engine failed (above); benchmarks/results/decode.json is unchanged")
    table = {}
    for name, rs in runs.items():
        if not rs:
            continue
        warm = [x["start_s"] for x in rs if x["start_s"] is not None]
        table[name] = dict(prefill_tok_s=args.prompt_tokens / min(x["prefill_s"] for x in rs),
                           decode_tok_s=(args.new_tokens - 1) / min(x["decode_s"] for x in rs),
                           peak_rss_mib=max(x["peak_rss_mib"] for x in rs), cold_start_s=cold.get(name),
                           decode_rss_mib=max((x.get("decode_rss_mib") or x["peak_rss_mib"]) for x in rs),
                           warm_start_s=min(warm) if warm else None, tokens=rs[0]["tokens"])
    ref = table.get("llama-bench")
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    print(f"\nSmolLM2-135M Q4_1, {args.prompt_tokens}-token prompt, {args.new_tokens} new tokens, batch 1, greedy, "
          f"{args.threads} threads, {os.cpu_count()} cores, load average at start {load_at_start:.2f}\n")
    print("| engine | prefill tok/s | decode tok/s | decode vs llama-bench | peak RSS MiB | RSS at decode MiB "
          "| RSS at decode vs llama-bench | cold start s | warm start s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, row in table.items():
        ratio = f"{row['decode_tok_s'] / ref['decode_tok_s']:.2f}x" if ref else "-"
        rss_ratio = f"{row['decode_rss_mib'] / ref['decode_rss_mib']:.2f}x" if ref else "-"
        print(f"| {name} | {row['prefill_tok_s']:.0f} | {row['decode_tok_s']:.1f} | {ratio} | "
              f"{row['peak_rss_mib']:.0f} | {row['decode_rss_mib']:.0f} | {rss_ratio} | {fmt(row['cold_start_s'], '.1f')} | "
              f"{fmt(row['warm_start_s'], '.1f')} |")
    ratios = {}
    llmlab_rows = {k: v for k, v in table.items() if k.startswith("llmlab") and "sampled" not in k}  # greedy paths
    if "llmlab default sampled" in table and ref:  # (llama-bench's figure has no sampling in it)
        ratios["llmlab default sampled: decode vs llama-bench"] = (table["llmlab default sampled"]["decode_tok_s"] /
                                                                   ref["decode_tok_s"])
    if llmlab_rows:
        best = max(llmlab_rows, key=lambda k: llmlab_rows[k]["decode_tok_s"])
        ratios["llmlab best"] = best
        for name in dict.fromkeys(["llmlab default", "llmlab lite", best]):
            ours = table.get(name)
            if ours and ref:
                ratios[f"{name}: decode vs llama-bench"] = ours["decode_tok_s"] / ref["decode_tok_s"]
                ratios[f"{name}: RSS at decode vs llama-bench"] = ours["decode_rss_mib"] / ref["decode_rss_mib"]
            if ours and "transformers fp32" in table:
                ratios[f"{name}: decode vs transformers fp32"] = (ours["decode_tok_s"] /
                                                                  table["transformers fp32"]["decode_tok_s"])
    if ref and llmlab_rows:  # the floor under any PyTorch engine: the interpreter with torch imported, nothing else
        floor = subprocess.run([sys.executable, "-c", "import resource, torch; "
                                "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)"],
                               capture_output=True, text=True)
        if floor.returncode == 0:
            ratios["python + import torch, RSS MiB"] = float(floor.stdout.strip())
            ratios["python + import torch, RSS vs llama-bench"] = float(floor.stdout) / ref["decode_rss_mib"]
            if "llmlab default" in table:  # what is llmlab's own (benchmarks/memory.py accounts for it stage by stage)
                ours = table["llmlab default"]["decode_rss_mib"] - float(floor.stdout)
                ratios["llmlab default: RSS at decode above python + torch, MiB"] = ours
                ratios["llmlab default: RSS at decode above python + torch vs llama-bench"] = ours / ref["decode_rss_mib"]
    exact = table.get("llmlab exact")
    for name, ours in llmlab_rows.items():
        if exact and name != "llmlab exact" and ours["tokens"] and exact["tokens"]:
            same = sum(a == b for a, b in zip(ours["tokens"], exact["tokens"]))
            ratios[f"{name}: greedy tokens equal to llmlab exact"] = f"{same}/{len(exact['tokens'])}"
    print()
    for k, v in ratios.items():
        print(f"{k}: {v:.2f}" if isinstance(v, float) else f"{k}: {v}")
    RESULTS.parent.mkdir(exist_ok=True)
    out = dict(prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens, cores=os.cpu_count(),
               threads=args.threads, engines={k: {kk: vv for kk, vv in v.items() if kk != "tokens"}
                                              for k, v in table.items()},
               ratios=ratios, load_average_at_start=load_at_start)
    tmp = RESULTS.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(out, indent=2) + "\n")
    os.replace(tmp, RESULTS)
    print(f"\nwritten {RESULTS}")


if __name__ == "__main__":
    main()
