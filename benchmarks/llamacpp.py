"""The llama.cpp peer for the benchmarks: find (or build) llama.cpp's own tools and measure a GGUF with llama-bench.

    python benchmarks/llamacpp.py [MODEL] [--type q4_1] [--prompt-tokens 128] [--new-tokens 128] [--threads 2]

MODEL (default smollm2) is a .gguf file, or any checkpoint llmlab reads, exported first with
`llmlab export gguf --type TYPE` into $LLMLAB_HOME/exports. The tools (llama-bench, llama-server, llama-cli,
llama-simple) are built once from the llama.cpp source vendored in the llama-cpp-python sdist by
benchmarks/build_llamacpp.sh (15-30 minutes on 2 cores) into $LLMLAB_HOME/llama.cpp/build/bin, or taken from
$LLAMACPP_BIN. Prints prefill and decode tokens/s and writes benchmarks/results/llamacpp.json.

Other benchmarks import it (`from llamacpp import bench, server, tool`): `bench()` for raw speed, `server()` for
an OpenAI-compatible llama-server on localhost. Run it on a quiet machine: on 2 cores any busy process halves it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

HERE = Path(__file__).resolve().parent
BUILD_SCRIPT = HERE / "build_llamacpp.sh"
RESULTS = HERE / "results" / "llamacpp.json"


def llmlab_home() -> Path:
    return Path(os.environ.get("LLMLAB_HOME", Path.home() / ".cache" / "llmlab"))


def bin_dir() -> Path:
    return Path(os.environ.get("LLAMACPP_BIN") or llmlab_home() / "llama.cpp" / "build" / "bin")


def tool(name: str, build: bool = True) -> Path:
    """The path of a llama.cpp tool (e.g. "llama-bench"), building the tools first when they are missing."""
    path = bin_dir() / name
    if not path.is_file() and build:
        print(f"building llama.cpp's tools with {BUILD_SCRIPT} (15-30 minutes)...", file=sys.stderr)
        subprocess.run(["bash", str(BUILD_SCRIPT)], check=True)
    if not path.is_file():
        raise SystemExit(f"{path} is missing: run `bash {BUILD_SCRIPT}` (or set LLAMACPP_BIN)")
    return path


def as_gguf(model: str, kind: str = "q4_1") -> Path:
    """A GGUF file for `model`: itself if it is one, else an llmlab export cached under $LLMLAB_HOME/exports."""
    if model.endswith(".gguf") and Path(model).is_file():
        return Path(model)
    from llmlab.checkpoint.gguf_export import export_checkpoint

    out = llmlab_home() / "exports" / f"{Path(model).name}-{kind}.gguf"
    if not out.is_file():
        export_checkpoint(model, out, kind)
    return out


def bench(gguf: str | Path, n_prompt: int = 128, n_gen: int = 128, threads: int = 2, reps: int = 3,
          depth: int = 0) -> dict:
    """llama-bench's prefill (pp, from an empty context) and decode (tg, after `depth` tokens of context: a decode
    after a prompt of that many tokens) speed on this GGUF, batch 1, mean over `reps` runs."""
    cmd = [str(tool("llama-bench")), "-m", str(gguf), "-p", str(n_prompt), "-n", str(n_gen), "-t", str(threads),
           "-r", str(reps), "-o", "json"] + (["-d", f"0,{depth}"] if depth else [])
    run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode != 0:
        raise SystemExit(f"llama-bench failed ({run.returncode}): {run.stderr[-2000:]}")
    rows = json.loads(run.stdout)
    prefill = next(r for r in rows if r["n_prompt"] > 0 and r["n_gen"] == 0 and r.get("n_depth", 0) == 0)
    decode = next(r for r in rows if r["n_gen"] > 0 and r["n_prompt"] == 0 and r.get("n_depth", 0) == depth)
    return {"prefill_tok_s": prefill["avg_ts"], "prefill_stddev": prefill["stddev_ts"],
            "decode_tok_s": decode["avg_ts"], "decode_stddev": decode["stddev_ts"],
            "model_type": prefill.get("model_type"), "build_commit": prefill.get("build_commit"),
            "cpu_info": prefill.get("cpu_info"), "threads": threads, "decode_depth": depth, "command": " ".join(cmd)}


@contextmanager
def server(gguf: str | Path, port: int, threads: int = 2, parallel: int = 1, ctx: int = 4096, timeout: float = 120):
    """llama-server (OpenAI-compatible) on 127.0.0.1:port; yields its /v1 base URL, stops it on exit."""
    cmd = [str(tool("llama-server")), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port),
           "-t", str(threads), "-np", str(parallel), "-c", str(ctx * parallel), "--no-webui"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"llama-server exited ({proc.returncode}): {proc.stderr.read()[-2000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"llama-server did not become ready within {timeout:.0f} s")
            time.sleep(0.5)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", nargs="?", default="smollm2", help=".gguf file, or a checkpoint llmlab exports first")
    p.add_argument("--type", default="q4_1", help="export type for a non-GGUF model (f32|f16|q8_0|q4_0|q4_1)")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()
    model = args.model
    if not model.endswith(".gguf"):  # a registry name whose file is already a GGUF needs no export
        from llmlab.checkpoint.registry import resolve
        resolved = resolve(model)
        model = str(resolved) if resolved.suffix == ".gguf" else model
    gguf = as_gguf(model, args.type)
    result = bench(gguf, args.prompt_tokens, args.new_tokens, args.threads, args.reps)
    result.update(model=str(gguf), prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens,
                  machine=platform.machine(), cores=os.cpu_count())
    print(f"llama.cpp {gguf.name}: prefill {result['prefill_tok_s']:.1f} tok/s (±{result['prefill_stddev']:.1f}), "
          f"decode {result['decode_tok_s']:.1f} tok/s (±{result['decode_stddev']:.1f}), {args.threads} threads")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, RESULTS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
