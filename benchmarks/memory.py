"""Where the resident memory of `llmlab.load("smollm2")` decoding goes, stage by stage, beside llama.cpp's.

    python benchmarks/memory.py [--prompt-tokens 128] [--new-tokens 128] [--threads 1]

One fresh process walks the default path (the native kernel on the GGUF's own Q4_1 weights), another the lite path
(`llmlab generate`'s: the same kernel, no PyTorch in the process, llmlab.engine.native.lite), and each reads
/proc/self/status after each stage: the interpreter, `import torch`, `import llmlab`, llmlab.load (and its peak while
loading), a warm-up, then the peak while prefilling and decoding with the peak reset first (decode.py's "RSS at
decode": the same definition). RSS splits into anonymous memory (heap, tensors) and file pages (shared libraries'
code, a memory-mapped model). Beside it, what the loaded objects hold by their own count: the packed weights and
the KV caches. llama-bench (`-p N -n N -t T`, built by benchmarks/build_llamacpp.sh) runs on the same file when
built: its peak RSS over its whole run. Prints a table; writes benchmarks/results/memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "memory.json"
TEXT = ("The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined "
        "movable metal type, oil-based ink and a screw press adapted from wine making. ") * 16


def status() -> dict:
    """VmRSS, VmHWM, RssAnon and RssFile of this process in MiB."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) / 1024
    return out


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM restarts from the current RSS


def walk(gguf: str, n_prompt: int, n_new: int, threads: int) -> dict:
    """The stages, in this process (call it in a fresh one)."""
    stages = [("python", status())]
    import torch
    stages.append(("+ import torch", status()))
    import llmlab
    import llmlab.api
    from llmlab.engine import SamplingParams
    stages.append(("+ import llmlab", status()))
    torch.set_num_threads(threads)
    torch.set_grad_enabled(False)
    reset_peak()
    llm = llmlab.load(gguf, announce=False)
    stages.append(("+ llmlab.load (RSS after; peak while loading)", status()))
    ids = llm.tokenizer.encode(TEXT)[:n_prompt]
    assert len(ids) == n_prompt, "TEXT too short"
    llm.engine.generate([ids], SamplingParams(max_new_tokens=4, temperature=0, ignore_eos=True))
    stages.append(("+ warm-up (prefill, 4 tokens)", status()))
    reset_peak()
    llm.engine.prefill(ids)
    llm.engine.generate([ids], SamplingParams(max_new_tokens=n_new, temperature=0, ignore_eos=True))
    stages.append(("peak while prefilling and decoding", status()))

    cfg = llm.model.config
    kv_dtype = llm.model.new_cache(1, 1).k[0].dtype  # (fp16 where the native step keeps its cache in fp16)
    kv_per_token = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * kv_dtype.itemsize
    cache_len = llm.engine._cache_len(n_prompt + n_new)
    held = {"packed weights (own count)": llmlab.api.weight_counts(llm.model)[1] / 2**20,
            f"KV cache, {cache_len} slots {str(kv_dtype).removeprefix('torch.')} (own count)": kv_per_token * cache_len / 2**20,
            f"prefill's own KV cache, {n_prompt} slots (own count)": kv_per_token * n_prompt / 2**20}
    return {"stages": stages, "held": held}


def walk_lite(gguf: str, n_prompt: int, n_new: int, threads: int) -> dict:
    """The same stages on `llmlab generate`'s path: the same kernel with no PyTorch in the process (native/lite.py)."""
    stages = [("python", status())]
    from llmlab.engine.native.lite import LiteModel
    stages.append(("+ import llmlab's lite runner (numpy, tokenizers, gguf)", status()))
    reset_peak()
    model = LiteModel(gguf)
    stages.append(("+ LiteModel (RSS after; peak while loading)", status()))
    ids = model.tokenizer.encode(TEXT)[:n_prompt]
    assert len(ids) == n_prompt, "TEXT too short"
    list(model.tokens(ids, model.params(max_new_tokens=4, temperature=0, ignore_eos=True)))
    stages.append(("+ warm-up (prefill, 4 tokens)", status()))
    reset_peak()
    list(model.tokens(ids, model.params(max_new_tokens=n_new, temperature=0, ignore_eos=True)))
    stages.append(("peak while prefilling and decoding", status()))
    assert "torch" not in sys.modules
    weights = sum(a.nbytes for a in model.keep if hasattr(a, "nbytes"))
    kv = sum(a.nbytes for a in model.k + model.v)
    return {"stages": stages, "held": {"packed weights (own count)": weights / 2**20,
                                       f"KV cache, {model.cache_len} slots (own count)": kv / 2**20}}


WALKS = {"default": walk, "lite": walk_lite}


def report(path: str, result: dict, args, peer: float | None) -> None:
    print(f"\nSmolLM2-135M Q4_1 ({Path(args.gguf).name}), llmlab {path} path, {args.prompt_tokens}-token prompt, "
          f"{args.new_tokens} new tokens, {args.threads} thread(s), MiB\n")
    print("| stage | RSS | change | peak (VmHWM) | anonymous | file pages |")
    print("|---|---:|---:|---:|---:|---:|")
    before = 0.0
    for name, s in result["stages"]:
        print(f"| {name} | {s['VmRSS']:.1f} | {s['VmRSS'] - before:+.1f} | {s['VmHWM']:.1f} | {s['RssAnon']:.1f} | "
              f"{s['RssFile']:.1f} |")
        before = s["VmRSS"]
    print()
    for name, mib in result["held"].items():
        print(f"{name}: {mib:.1f} MiB")
    decode = result["stages"][-1][1]["VmHWM"]
    floor = result["stages"][1][1]["VmRSS"]
    print(f"RSS at decode: {decode:.1f} MiB, of which python + {result['stages'][1][0][2:]} {floor:.1f}, "
          f"above that {decode - floor:.1f}")
    if peer:
        print(f"llama-bench peak RSS: {peer:.1f} MiB; llmlab {path} / llama-bench {decode / peer:.2f}x "
              f"(above the imports alone: {(decode - floor) / peer:.2f}x)")


def llama_bench_peak(gguf: str, n_prompt: int, n_new: int, threads: int) -> float | None:
    """llama-bench's peak RSS in MiB (None when it is not built)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from llamacpp import bin_dir
    tool = bin_dir() / "llama-bench"
    if not tool.is_file():
        return None
    subprocess.run([str(tool), "-m", gguf, "-p", str(n_prompt), "-n", str(n_new), "-t", str(threads), "-r", "1"],
                   capture_output=True, check=True)
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--gguf", default=None, help="GGUF file (default: the smollm2 registry model)")
    ap.add_argument("--worker", choices=list(WALKS), default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(WALKS[args.worker](args.gguf, args.prompt_tokens, args.new_tokens, args.threads)))
        return
    if args.gguf is None:
        from llmlab.checkpoint.registry import resolve
        args.gguf = str(resolve("smollm2"))
    # llama-bench first: RUSAGE_CHILDREN's peak is the largest of all children waited for so far
    peer = llama_bench_peak(args.gguf, args.prompt_tokens, args.new_tokens, args.threads)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "LLMLAB_NATIVE_THREADS": str(args.threads)}
    results = {"llama_bench_peak_rss_mib": peer}
    for path in WALKS:  # each in a fresh process
        cmd = [sys.executable, __file__, "--worker", path, "--gguf", args.gguf, "--threads", str(args.threads),
               "--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens)]
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            raise SystemExit(f"the {path} worker failed:\n{done.stderr[-2000:]}")
        results[path] = json.loads(line[7:])
        report(path, results[path], args, peer)
    RESULTS.parent.mkdir(exist_ok=True)
    tmp = RESULTS.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({**results, **vars(args)}, indent=2) + "\n")
    os.replace(tmp, RESULTS)
    print(f"\nwritten {RESULTS}")


if __name__ == "__main__":
    main()
