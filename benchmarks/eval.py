"""Multiple-choice evaluation speed: llmlab in-process against lm-evaluation-harness's `hf` model, same task,
same weights, one run.

    python benchmarks/eval.py [--items 100] [--lm-eval-batch 8] [--rounds 1]

The task is the built-in bios_mc (open-book 4-way multiple choice over a generated biography), written once to
JSONL and given to lm-eval as a local task with the same prompt and the same " " before each choice. Each
engine runs in its own fresh process on the SmolLM2 Q4_1 GGUF dequantized to float32 (llmlab's loader, and
transformers' GGUF loader for lm-eval). Prints items/s, acc and acc_norm per engine and writes
benchmarks/results/eval.json. Bar: llmlab >= 2x faster with the same accuracies.

Why llmlab is faster: the four choices of a question share their context, which llmlab runs once into a KV
cache and then scores all four continuations from it; lm-eval runs context + choice four times.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "eval.json"

LM_EVAL_TASK = """task: llmlab_bios_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{biography}}}}\\nQuestion: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{gold}}}}"
target_delimiter: " "
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


def write_data(n: int, directory: Path) -> Path:
    from llmlab.eval.builtin import bios_mc
    path = directory / "bios_mc.jsonl"
    path.write_text("".join(json.dumps(it) + "\n" for it in bios_mc(n, 0)))
    return path


def run_llmlab(gguf: str, data: Path, n: int, _batch: int) -> dict:
    import llmlab
    from llmlab.client import LocalClient
    from llmlab.eval.tasks import load_task, run_task
    llm = llmlab.load(gguf)
    spec = data.parent / "bios_mc.yaml"
    spec.write_text(f"name: bios_mc_bench\ntype: multiple_choice\ndata: {data}\n"
                    "prompt: \"{biography}\\nQuestion: {question}\\nAnswer:\"\nchoices: choices\ngold: gold\n")
    out = data.parent / f"llmlab_out_{time.time_ns()}"
    t0 = time.perf_counter()
    s = run_task(load_task(spec), LocalClient(llm), out, chunk=64)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "acc": s["metrics"]["acc"]["mean"], "acc_norm": s["metrics"]["acc_norm"]["mean"]}


def run_lm_eval(gguf: str, data: Path, n: int, batch: int) -> dict:
    import torch
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import AutoModelForCausalLM, AutoTokenizer
    g = Path(gguf)
    model = AutoModelForCausalLM.from_pretrained(g.parent, gguf_file=g.name, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(g.parent, gguf_file=g.name)
    task_dir = data.parent / "lm_eval_tasks"
    task_dir.mkdir(exist_ok=True)
    (task_dir / "llmlab_bios_mc.yaml").write_text(LM_EVAL_TASK.format(data=data))
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=batch)
    t0 = time.perf_counter()
    res = simple_evaluate(model=lm, tasks=["llmlab_bios_mc"], task_manager=TaskManager(include_path=str(task_dir)),
                          log_samples=False)
    seconds = time.perf_counter() - t0
    r = res["results"]["llmlab_bios_mc"]
    return {"seconds": seconds, "acc": r["acc,none"], "acc_norm": r["acc_norm,none"]}


ENGINES = {"llmlab": run_llmlab, "lm-eval hf": run_lm_eval}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--items", type=int, default=100)
    ap.add_argument("--lm-eval-batch", type=int, default=8, help="lm-eval's batch size (its default is 1)")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--gguf", default=None)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--data", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(ENGINES[args.worker](args.gguf, Path(args.data), args.items, args.lm_eval_batch)))
        return
    if args.gguf is None:
        from llmlab.checkpoint.registry import resolve
        args.gguf = str(resolve("smollm2"))
    print(f"load average before start: {os.getloadavg()[0]:.2f} (want ~0 on a quiet machine)", file=sys.stderr)
    tmp = Path(tempfile.mkdtemp(prefix="llmlab_eval_bench_"))
    data = write_data(args.items, tmp)
    runs: dict[str, list] = {n: [] for n in ENGINES}
    for r in range(args.rounds):
        for name in ENGINES:
            cmd = [sys.executable, __file__, "--worker", name, "--gguf", args.gguf, "--data", str(data),
                   "--items", str(args.items), "--lm-eval-batch", str(args.lm_eval_batch)]
            p = subprocess.run(cmd, capture_output=True, text=True)
            line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                print(f"{name}: failed\n{p.stderr[-3000:]}", file=sys.stderr)
                continue
            res = json.loads(line[7:])
            runs[name].append(res)
            print(f"round {r + 1} {name}: {args.items / res['seconds']:.2f} items/s, acc {res['acc']:.4f}, "
                  f"acc_norm {res['acc_norm']:.4f}", file=sys.stderr)
    table = {n: {"items_per_s": args.items / min(x["seconds"] for x in rs), "acc": rs[0]["acc"],
                 "acc_norm": rs[0]["acc_norm"]} for n, rs in runs.items() if rs}
    print(f"\nbios_mc, {args.items} items x 4 choices, SmolLM2-135M fp32, {os.cpu_count()} cores, "
          f"lm-eval batch size {args.lm_eval_batch}\n")
    print("| engine | items/s | acc | acc_norm |\n|---|---:|---:|---:|")
    for n, row in table.items():
        print(f"| {n} | {row['items_per_s']:.2f} | {row['acc']:.4f} | {row['acc_norm']:.4f} |")
    out = {"items": args.items, "lm_eval_batch": args.lm_eval_batch, "cores": os.cpu_count(), "engines": table,
           "load_average_at_end": os.getloadavg()[0]}
    if len(table) == 2:
        a, b = table["llmlab"], table["lm-eval hf"]
        out["speedup"] = a["items_per_s"] / b["items_per_s"]
        out["same_accuracy"] = abs(a["acc"] - b["acc"]) < 1e-9 and abs(a["acc_norm"] - b["acc_norm"]) < 1e-9
        print(f"\nspeedup {out['speedup']:.2f}x; same acc and acc_norm: {out['same_accuracy']}")
    from llmlab.io import atomic_write_text
    atomic_write_text(RESULTS, json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
