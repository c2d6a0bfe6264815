"""A distilled draft model for SmolLM2-135M-Instruct: its acceptance rate as SmolLM2's speculative draft, against
distillation steps.

    .venv/bin/python experiments/distill_draft.py [--layers 0,6,12,18,24,29] [--steps 30] [--every 10] [--stage all|...]

1. data: prompts of benchmarks/speculative.py's kinds (summarise, extract, rewrite code, answer from a passage of
   Python's standard library; open-ended questions) from passages the benchmark does not use, the first --answered
   with SmolLM2's own greedy answer (the tokens a greedy draft has to guess), as JSONL {"prompt", "completion"};
   nothing is downloaded.
2. init: the student starts as SmolLM2 with only --layers kept (its embedding, final norm and tied output layer
   included; layer dropping as in DistilBERT, Sanh et al. 2019), so it shares the tokenizer by construction.
3. distill: `llmlab distill --mode kl` (token-level forward KL to SmolLM2's next-token distribution on every token
   of prompt and answer), a checkpoint every --every steps.
4. measure: each checkpoint (and the undistilled init) drafts k=5 tokens for SmolLM2 (fp32 eager, greedy) with the
   engine's SpeculativeDecoder, drafting never turned off, on benchmarks/speculative.py's own prompts (offset 0);
   its stats give the acceptance rate (drafted tokens kept), tokens per verify step and the per-token alpha of
   Leviathan et al. 2023 (see per_token_alpha). Speed is not measured.
Writes experiments/results/distill_draft/{acceptance.md,acceptance.json,acceptance.png}. Run with one thread
(OMP_NUM_THREADS=1 LLMLAB_NATIVE_THREADS=1); the stages are cached under runs/distill_draft.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import save_figure, write_results  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "distill_draft"
RUN = ROOT / "runs" / "distill_draft"
DRAFT_TOKENS = 5
# Leviathan et al. 2023 (Table 3): T5-small (77M) drafting for T5-XXL (11B) on EnDe translation, alpha = 0.75 (greedy);
# DistillSpec (Zhou et al. 2023) reports 10-45% further speed-up over standard speculative decoding from distilling
# the draft.
PAPER = {"Leviathan et al. 2023, T5-small for T5-XXL (greedy, EnDe)": 0.75}


def make_data(path: Path, n: int, answered: int, max_new_tokens: int = 64) -> Path:
    """n prompts of the benchmark's kinds, the first `answered` with SmolLM2's greedy answers, as {"prompt",
    "completion"} JSONL (the rest {"prompt"} only: the KL then covers the prompt's tokens)."""
    if path.is_file():
        return path
    import llmlab
    from llmlab.engine import SamplingParams
    from llmlab.io import atomic_write_text
    from speculative import write_distill_data
    prompts_file = path.with_name("prompts.jsonl")
    write_distill_data(str(prompts_file), n)
    records = [json.loads(line) for line in prompts_file.read_text().splitlines()]
    llm = llmlab.load("smollm2", exact=True)
    params = SamplingParams(temperature=0, max_new_tokens=max_new_tokens)
    t0 = time.perf_counter()
    for i in range(0, answered, 8):
        chunk = records[i:min(i + 8, answered)]
        for record, done in zip(chunk, llm.engine.generate([llm.prompt_ids(r["prompt"]) for r in chunk], params)):
            record["completion"] = done.text
        print(f"teacher answers {i + len(chunk)}/{answered} ({time.perf_counter() - t0:.0f} s)", flush=True)
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))
    return path


def make_init(path: Path, layers: list[int]) -> Path:
    """SmolLM2 with only `layers` kept (embedding, final norm and output layer as they are), in HF layout."""
    if (path / "config.json").is_file():
        return path
    from llmlab.checkpoint.hf import save_hf_dir
    from llmlab.checkpoint.load import load_checkpoint
    from llmlab.model import Transformer
    teacher, tokenizer, _ = load_checkpoint("smollm2", torch.float32)
    student = Transformer(dataclasses.replace(teacher.config, n_layers=len(layers)))
    state = {}
    for name, tensor in teacher.state_dict().items():
        if not name.startswith("model.layers."):
            state[name] = tensor
            continue
        index, rest = name[len("model.layers."):].split(".", 1)
        if int(index) in layers:
            state[f"model.layers.{layers.index(int(index))}.{rest}"] = tensor
    student.load_state_dict(state, strict=False)  # (buffers such as RoPE tables are rebuilt, not copied)
    return save_hf_dir(student, path, dtype="float32", tokenizer=tokenizer)


def distill_command(data: Path, init: Path, out: Path, steps: int, every: int) -> list[str]:
    return ["distill", "--teacher", "smollm2", "--student", str(init), "--data", str(data), "--mode", "kl",
            "--max-steps", str(steps), "--save-every", str(every), "--eval-every", str(every), "--keep-last", "1000",
            "--seq-len", "256", "--micro-batch", "2", "--warmup-steps", "10", "--lr", "1e-3", "--min-lr", "1e-4",
            "--threads", "1", "--out-dir", str(out)]


def checkpoints(init: Path, run: Path) -> list[tuple[int, Path | None]]:
    """[(step, weights file)] of the run, step 0 being the undistilled init (None: the init's own weights)."""
    found = sorted((int(p.name.split("_")[1]), p / "model.safetensors") for p in (run / "checkpoints").glob("step_*")
                   if (p / "model.safetensors").is_file())
    return [(0, None)] + found


def measure(init: Path, run: Path, per_kind: int, new_tokens: int) -> list[dict]:
    """Acceptance and tokens per verify step of every checkpoint as a greedy draft for SmolLM2."""
    from safetensors.torch import load_file
    import llmlab
    from llmlab.checkpoint.load import load_checkpoint
    from llmlab.engine import SamplingParams
    from llmlab.engine.draft import ModelDrafter
    from llmlab.engine.speculative import SpeculativeDecoder
    from speculative import GROUNDED, task_prompts
    target = llmlab.load("smollm2", exact=True)
    prompts = task_prompts(per_kind, offset=0, seed=0)  # the benchmark's own prompts
    params = SamplingParams(temperature=0, max_new_tokens=new_tokens)
    rows = []
    for step, weights in checkpoints(init, run):
        student = load_checkpoint(init, torch.float32)[0]
        if weights is not None:
            student.load_state_dict(load_file(weights), strict=False)
        row = {"step": step}
        for group, kinds in (("input-grounded", list(GROUNDED)), ("open-ended", ["open-ended"])):
            decoder = SpeculativeDecoder(target.engine, ModelDrafter(student), DRAFT_TOKENS, min_acceptance=0.0,
                                         auto_off=False)
            for kind in kinds:
                for prompt in prompts[kind]:
                    decoder.generate(target.prompt_ids(prompt), params)
            row[f"{group} acceptance"] = round(decoder.stats.acceptance_rate, 4)
            row[f"{group} tokens/step"] = round(decoder.stats.tokens_per_step, 3)
            row[f"{group} drafted"] = decoder.stats.drafted
            row[f"{group} alpha"] = round(per_token_alpha(decoder.stats), 4)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def per_token_alpha(stats) -> float:
    """Leviathan et al.'s alpha, the chance that one draft token is kept, from greedy speculation's stats: every
    verify step decides its accepted tokens plus one of the target's, and (unless all k were kept, rare here) ends at
    one rejected draft token, so alpha ~= accepted / (accepted + verify steps) = 1 - 1 / tokens per step. The
    acceptance rate (kept / drafted) is lower: the k - 1 tokens drafted after a rejection are never judged."""
    return stats.accepted / (stats.accepted + stats.verify_steps) if stats.verify_steps else 0.0


def val_log(run: Path) -> dict[int, float]:
    """{step: held-out top-1 agreement with the teacher} from the training log."""
    out = {}
    for path in sorted(run.glob("*.jsonl")):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if "val_agreement" in record:
                out[int(record["step"])] = record["val_agreement"]
    return out


def plot(path: Path, rows: list[dict], n_layers: int):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    steps = [r["step"] for r in rows]
    for group, color in (("input-grounded", "C0"), ("open-ended", "C1")):
        ax.plot(steps, [r[f"{group} alpha"] for r in rows], "o-", color=color, label=f"{group}: alpha")
        ax.plot(steps, [r[f"{group} acceptance"] for r in rows], "x:", color=color, label=f"{group}: kept / drafted")
    agreement = [(r["step"], r["held-out top-1 agreement"]) for r in rows if "held-out top-1 agreement" in r]
    if agreement:
        ax.plot(*zip(*agreement), "s--", color="C2", label="held-out top-1 agreement (distillation data)")
    for name, value in PAPER.items():
        ax.axhline(value, color="grey", linestyle="--", linewidth=1)
        ax.text(steps[-1], value + 0.01, f"paper: {name}, alpha {value}", ha="right", va="bottom", fontsize=7,
                color="grey")
    ax.set_ylim(0, 1)
    ax.set_xlabel("distillation steps (token-level KL, 2 x 256 tokens a step)")
    ax.set_ylabel("acceptance (greedy, k = 5)")
    ax.set_title(f"{n_layers}-layer SmolLM2 draft for SmolLM2-135M-Instruct")
    ax.legend(fontsize=7, loc="center right")
    save_figure(fig, path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", default="0,6,12,18,24,29", help="teacher layers the student keeps")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--every", type=int, default=10)
    p.add_argument("--prompts", type=int, default=160, help="distillation prompts")
    p.add_argument("--answered", type=int, default=48, help="how many of them get the teacher's greedy answer")
    p.add_argument("--per-kind", type=int, default=2, help="benchmark prompts per task kind for the acceptance")
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--stage", choices=["all", "data", "init", "distill", "measure", "plot"], default="all")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    layers = [int(v) for v in args.layers.split(",")]
    RUN.mkdir(parents=True, exist_ok=True)
    data, init, run = RUN / "data.jsonl", RUN / "init", RUN / "run"
    if args.stage in ("all", "data"):
        make_data(data, args.prompts, args.answered)
    if args.stage in ("all", "init"):
        make_init(init, layers)
    if args.stage in ("all", "distill"):
        from llmlab.cli.main import main as llmlab_main
        command = distill_command(data, init, run, args.steps, args.every)
        print("llmlab " + " ".join(command), flush=True)
        t0 = time.perf_counter()
        code = llmlab_main(command + (["--resume"] if (run / "checkpoints").exists() else []))
        print(f"distill: exit {code}, {time.perf_counter() - t0:.0f} s", flush=True)
    if args.stage in ("all", "measure"):
        rows = measure(init, run, args.per_kind, args.new_tokens)
        agreement = val_log(run)
        for row in rows:
            if row["step"] in agreement:
                row["held-out top-1 agreement"] = round(agreement[row["step"]], 4)
        note = (f"Draft: SmolLM2-135M-Instruct layers {layers} (of 30), distilled with token-level KL; target SmolLM2 "
                f"fp32 greedy; k={DRAFT_TOKENS} draft tokens, {args.new_tokens} new tokens on "
                f"benchmarks/speculative.py's prompts ({args.per_kind} per kind). Paper: {PAPER}.")
        write_results(RESULTS, "acceptance", rows, note)
    if args.stage in ("all", "measure", "plot"):
        plot(RESULTS / "acceptance.png", json.loads((RESULTS / "acceptance.json").read_text())["rows"], len(layers))


if __name__ == "__main__":
    main()
