"""A distilled draft model for SmolLM2-135M-Instruct: its acceptance (alpha) as SmolLM2's speculative draft against
distillation steps, its cost per token against the target's, and the speed-up both predict.

    OMP_NUM_THREADS=1 LLMLAB_NATIVE_THREADS=1 nice -n 19 .venv/bin/python experiments/distill_draft.py \
        [--layers 0,6,12,18,24,29] [--steps 400] [--every 50] [--vocab 8192] [--stage all|data|init|distill|...]

1. data: --prompts prompts of benchmarks/speculative.py's kinds (summarise, extract, rewrite code, answer from a
   passage of Python's standard library; open-ended questions), none quoting a passage of the benchmark's own
   prompts, the first --answered with SmolLM2's greedy answer (its default native path: the tokens a greedy draft
   has to guess), as JSONL {"prompt", "completion"}; nothing is downloaded.
2. init: the student starts as SmolLM2 with only --layers kept (its embedding, final norm and tied output layer
   included; layer dropping as in DistilBERT, Sanh et al. 2019), so it shares the tokenizer by construction.
3. distill: `llmlab distill --mode kl` (token-level forward KL to SmolLM2's next-token distribution on every token
   of prompt and answer, rows of 512 tokens), a checkpoint every --every steps; rerunning the stage resumes.
4. draft: the latest checkpoint knowing only the --vocab most frequent tokens of the data (train/distill.py
   save_draft): SmolLM2's tied 49152 x 576 output head is most of a 6-layer draft's step; with 8192 rows its
   greedy guesses are the full draft's whenever the guess is one of them. Written to RUN/draft, for
   `--speculate draft:RUN/draft` and `benchmarks/speculative.py --drafts draft:RUN/draft`.
5. measure: alpha of each checkpoint (full and small vocabulary) = the share of SmolLM2's greedy answer tokens
   (benchmarks/speculative.py's own prompts, offset 0) that the student guesses given the answer before them,
   exactly a greedy draft's chance of being kept; tokens per verify step simulated for k=5; and for the last
   checkpoint the engine's own SpeculativeDecoder (k=5, never off) on the same prompts.
6. cost: one native decode step of the target, of a (k + 1)-row verify and of each draft, ONE thread, alternating;
   the speed-ups that alpha and these costs predict (Leviathan et al. 2023), by the paper's formula and with the
   measured verify cost.
Writes experiments/results/distill_draft/{acceptance,cost,speedup}.{md,json} and acceptance.png.
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


def benchmark_passages(per_kind: int = 4) -> list[str]:
    """The passages of benchmarks/speculative.py's own prompts (offset 0, seed 0; the benchmark runs 2 per kind):
    distillation prompts that quote one are dropped, so the acceptance is measured on text the draft never saw."""
    from speculative import GROUNDED, task_prompts
    out = []
    for kind, template in GROUNDED.items():
        head, _, tail = template.partition("{")
        tail = tail.partition("}")[2]
        out += [p[len(head):len(p) - len(tail)] for p in task_prompts(per_kind, offset=0, seed=0)[kind]]
    return out


def make_data(path: Path, n: int, answered: int, max_new_tokens: int = 64) -> Path:
    """n prompts of the benchmark's kinds (none quoting a benchmark passage), the first `answered` with SmolLM2's
    greedy answers (the default native decode path: what the benchmark's target says), as {"prompt", "completion"}
    JSONL (the rest {"prompt"} only: the KL then covers the prompt's tokens)."""
    if path.is_file():
        return path
    import llmlab
    from llmlab.engine import SamplingParams
    from llmlab.io import atomic_write_text
    from speculative import write_distill_data
    prompts_file = path.with_name("prompts.jsonl")
    write_distill_data(str(prompts_file), n)
    held_out = benchmark_passages()
    records = [json.loads(line) for line in prompts_file.read_text().splitlines()]
    records = [r for r in records if not any(p in r["prompt"] for p in held_out)]
    print(f"{len(records)} prompts quote no benchmark passage", flush=True)
    llm = llmlab.load("smollm2")
    params = SamplingParams(temperature=0, max_new_tokens=max_new_tokens)
    t0 = time.perf_counter()
    answered = min(answered, len(records))
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


def distill_command(data: Path, init: Path, out: Path, steps: int, every: int, lr: float) -> list[str]:
    """Token-level KL on every token of prompt and answer; rows of 512 tokens so an answer is never cut off."""
    return ["distill", "--teacher", "smollm2", "--student", str(init), "--data", str(data), "--mode", "kl",
            "--max-steps", str(steps), "--save-every", str(every), "--eval-every", str(every), "--keep-last", "1000",
            "--seq-len", "512", "--micro-batch", "1", "--warmup-steps", "20", "--lr", str(lr), "--min-lr",
            str(lr / 10), "--threads", "1", "--out-dir", str(out)]


def checkpoints(run: Path) -> list[tuple[int, Path | None]]:
    """[(step, weights file)] of the run, step 0 being the undistilled init (None: the init's own weights)."""
    found = sorted((int(p.name.split("_")[1]), p / "model.safetensors") for p in (run / "checkpoints").glob("step_*")
                   if (p / "model.safetensors").is_file())
    return [(0, None)] + found


def student_at(init: Path, weights: Path | None):
    from safetensors.torch import load_file
    from llmlab.checkpoint.load import load_checkpoint
    student = load_checkpoint(init, torch.float32)[0]
    if weights is not None:
        student.load_state_dict(load_file(weights), strict=False)
    return student.eval()


def draft_vocab(data: Path, tokenizer, n: int) -> list[int]:
    """The n most frequent tokens of the distillation data (prompts and the teacher's answers), end of turn first;
    when the data has fewer, the lowest other ids (a BPE vocabulary's ids run in merge order: frequent first)."""
    from llmlab.train.distill import frequent_tokens, load_examples
    special = [tokenizer.encode(t)[0] for t in ("<|im_end|>", "<|im_start|>", "<|endoftext|>")]
    picked = frequent_tokens(load_examples(data, tokenizer), n, always=special)
    seen = set(picked)
    return picked + [t for t in range(tokenizer.vocab_size) if t not in seen][:n - len(picked)]


def trajectories(root: Path, target, per_kind: int, new_tokens: int) -> dict[str, list[tuple[list[int], list[int]]]]:
    """{group: [(prompt ids, the target's greedy answer)]} on benchmarks/speculative.py's own prompts, cached."""
    from llmlab.engine import SamplingParams
    from speculative import GROUNDED, task_prompts
    path = root / f"trajectories_{per_kind}_{new_tokens}.json"
    if path.is_file():
        return json.loads(path.read_text())
    prompts = task_prompts(per_kind, offset=0, seed=0)
    params = SamplingParams(temperature=0, max_new_tokens=new_tokens)
    out = {}
    for group, kinds in (("input-grounded", list(GROUNDED)), ("open-ended", ["open-ended"])):
        ids = [target.prompt_ids(p) for kind in kinds for p in prompts[kind]]
        out[group] = [(i, done.token_ids) for i, done in zip(ids, target.engine.generate(ids, params))]
    path.write_text(json.dumps(out))
    return out


@torch.no_grad()
def agreement(student, pairs, token_ids: list[int] | None = None) -> list[list[bool]]:
    """Per answer token: is it the student's greedy guess, given the prompt and the target's answer before it? On the
    target's greedy trajectory that is exactly whether a greedy draft of it is kept (Leviathan et al.'s alpha is
    its mean). token_ids: the student is shrink_vocab(..., token_ids), every other token fed as its last row."""
    to_draft = None
    if token_ids is not None:
        to_draft = torch.full((49152,), len(token_ids), dtype=torch.long)
        to_draft[torch.tensor(token_ids)] = torch.arange(len(token_ids))
    out = []
    for prompt, answer in pairs:
        ids = torch.tensor([prompt + answer[:-1]])
        logits = student(ids if to_draft is None else to_draft[ids])[0, len(prompt) - 1:]
        guess = logits[:, :-1].argmax(-1) if token_ids is not None else logits.argmax(-1)
        if token_ids is not None:
            guess = torch.tensor(token_ids)[guess]
        out.append([int(g) == t for g, t in zip(guess, answer)])
    return out


def simulate(agree: list[list[bool]], k: int) -> dict:
    """Greedy speculation with k drafts on the recorded trajectories: acceptance (kept / drafted), tokens per
    verify step (the prefill's first token aside)."""
    drafted = kept = steps = tokens = 0
    for row in agree:
        i = 1  # the prefill decides the first answer token
        while i < len(row):
            n = min(k, len(row) - i)
            run = next((j for j in range(n) if not row[i + j]), n)
            drafted, kept, steps = drafted + n, kept + run, steps + 1
            tokens += min(run + 1, len(row) - i)
            i += run + 1
    return {"acceptance": kept / max(1, drafted), "tokens/step": tokens / max(1, steps)}


def measure_real(target, drafter, pairs) -> dict:
    """The engine's SpeculativeDecoder with this drafter on the prompts (greedy, k = DRAFT_TOKENS, never off)."""
    from llmlab.engine import SamplingParams
    from llmlab.engine.speculative import SpeculativeDecoder
    decoder = SpeculativeDecoder(target.engine, drafter, DRAFT_TOKENS, min_acceptance=0.0, auto_off=False)
    same = 0
    for prompt, answer in pairs:
        done = decoder.generate(prompt, SamplingParams(temperature=0, max_new_tokens=len(answer)))
        same += done.token_ids == answer
    s = decoder.stats
    return {"acceptance": round(s.acceptance_rate, 4), "tokens/step": round(s.tokens_per_step, 3),
            "alpha": round(per_token_alpha(s), 4), "same output": f"{same}/{len(pairs)}"}


def per_token_alpha(stats) -> float:
    """Leviathan et al.'s alpha from greedy speculation's stats: every verify step decides its accepted tokens plus
    one of the target's and (unless all k were kept) ends at one rejected draft, so alpha ~= accepted / (accepted +
    verify steps). The acceptance rate (kept / drafted) is lower: drafts after a rejection are never judged."""
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


def step_costs(target, drafts: dict, rounds: int = 15, steps: int = 20, pos: int = 300) -> dict[str, tuple]:
    """{name: (median seconds, median ratio to the same round's target step)} of one native decode step at position
    ~pos, ONE thread, every kind in turn each round (so load drifts hit all alike): the target's plain step, its
    verify of j = 2..8 rows, each draft's step."""
    from llmlab.engine.native import NativeDecoder
    runs = {"target": (target.engine.native_step, target.model, 1)}
    runs |= {f"verify {j}": (target.engine.native_step, target.model, j) for j in range(2, 9)}
    runs |= {name: (NativeDecoder(model), model, 1) for name, model in drafts.items()}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, (step, model, rows) in runs.items():
            cache = model.new_cache(1, pos + steps + 16)
            t0 = time.perf_counter()
            for i in range(steps):
                step(torch.full((rows, 1), 100), torch.arange(pos + i, pos + i + rows).view(-1, 1), cache,
                     cache_rows=torch.zeros(rows, dtype=torch.long))
            times[name].append((time.perf_counter() - t0) / steps)
    median = lambda values: sorted(values)[len(values) // 2]  # noqa: E731
    return {name: (median(t), median([a / b for a, b in zip(t, times["target"])])) for name, t in times.items()}


def speedup(alpha: float, c: float, k: int, verify: float = 1.0) -> float:
    """Leviathan et al. 2023 (Thm 3.8): expected tokens per verify (1 - a^(k+1)) / (1 - a) over the step's cost
    c k + 1 in target steps; `verify` replaces the 1 with the measured cost of a (k + 1)-row verify."""
    return (1 - alpha ** (k + 1)) / ((1 - alpha) * (c * k + verify))


def best_speedup(alpha: float, c: float, verify: dict[int, float] | None = None) -> tuple[float, int]:
    """(the largest predicted speed-up, its k) over k = 1..7; verify: {rows: cost in target steps}."""
    return max((speedup(alpha, c, k, verify[k + 1] if verify else 1.0), k) for k in range(1, 8))


def break_even_alpha(c: float, verify: dict[int, float] | None = None) -> float:
    """The least alpha (to 0.01) at which some k predicts a speed-up >= 1."""
    return next((a / 100 for a in range(100) if best_speedup(a / 100, c, verify)[0] >= 1), 1.0)


def plot(path: Path, rows: list[dict], title: str, break_even: float | None):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    steps = [r["step"] for r in rows]
    for group, color in (("input-grounded", "C0"), ("open-ended", "C1")):
        ax.plot(steps, [r[f"{group} alpha"] for r in rows], "o-", color=color, label=f"{group}: alpha (full vocab)")
        if f"{group} alpha, small vocab" in rows[0]:
            ax.plot(steps, [r[f"{group} alpha, small vocab"] for r in rows], "x:", color=color,
                    label=f"{group}: alpha (frequent-token vocab)")
    agreement_rows = [(r["step"], r["held-out top-1 agreement"]) for r in rows if "held-out top-1 agreement" in r]
    if agreement_rows:
        ax.plot(*zip(*agreement_rows), "s--", color="C2", label="held-out top-1 agreement (distillation data)")
    for name, value in PAPER.items():
        ax.axhline(value, color="grey", linestyle="--", linewidth=1)
        ax.text(steps[-1], value - 0.01, f"paper: {name}, alpha {value}", ha="right", va="top", fontsize=7,
                color="grey")
    if break_even is not None:
        ax.axhline(break_even, color="C3", linestyle=":", linewidth=1)
        ax.text(steps[-1], break_even - 0.01, f"alpha at which the frequent-token draft breaks even "
                f"({break_even:.2f}, measured costs)", ha="right", va="top", fontsize=7, color="C3")
    ax.set_ylim(0, 1)
    ax.set_xlabel("distillation steps (token-level KL, 512 tokens a step)")
    ax.set_ylabel("alpha: share of greedy drafts kept")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(0, 0.73))
    save_figure(fig, path)


def measure(root: Path, init: Path, run: Path, args) -> list[dict]:
    """alpha (per-token acceptance on the target's greedy trajectories) of every checkpoint, full vocabulary and
    --vocab frequent tokens; the engine's own speculative decoding for the last checkpoint."""
    import llmlab
    from llmlab.engine.draft import ModelDrafter
    from llmlab.train.distill import shrink_vocab
    target = llmlab.load("smollm2")  # the default (native) path, what benchmarks/speculative.py runs
    pairs = trajectories(root, target, args.per_kind, args.new_tokens)
    vocab = draft_vocab(root / "data.jsonl", target.tokenizer, args.vocab)
    answers = [t for group in pairs.values() for _, answer in group for t in answer]
    agreement_log, rows = val_log(run), []
    found = checkpoints(run)
    for step, weights in found:
        student = student_at(init, weights)
        small = shrink_vocab(student, vocab)
        row = {"step": step}
        for group, group_pairs in pairs.items():
            for label, model, ids in (("", student, None), (", small vocab", small, vocab)):
                agree = agreement(model, group_pairs, ids)
                flat = [a for r in agree for a in r]
                row[f"{group} alpha{label}"] = round(sum(flat) / len(flat), 4)
                row[f"{group} tokens/step (k={DRAFT_TOKENS}){label}"] = round(simulate(agree, DRAFT_TOKENS)["tokens/step"], 3)
        if step in agreement_log:
            row["held-out top-1 agreement"] = round(agreement_log[step], 4)
        if step == found[-1][0]:
            for label, drafter in (("", ModelDrafter(student)), (", small vocab", ModelDrafter(
                    small, token_ids=vocab, vocab_size=target.model.config.vocab_size))):
                for group, group_pairs in pairs.items():
                    real = measure_real(target, drafter, group_pairs)
                    row |= {f"{group} engine {key}{label}": value for key, value in real.items()}
        rows.append(row)
        print(json.dumps(row), flush=True)
    coverage = sum(t in set(vocab) for t in answers) / len(answers)
    return rows, coverage


def costs(root: Path, init: Path, run: Path, args) -> list[dict]:
    """The draft's step against the target's (full and frequent-token vocabulary), one thread, under whatever load."""
    import llmlab
    from llmlab.train.distill import shrink_vocab
    target = llmlab.load("smollm2")
    student = student_at(init, checkpoints(run)[-1][1])
    vocab = draft_vocab(root / "data.jsonl", target.tokenizer, args.vocab)
    seconds = step_costs(target, {"draft": student, "draft, small vocab": shrink_vocab(student, vocab)})
    return [{"step": name, "ms": round(1e3 * t, 3), "relative to the target's step": round(ratio, 3)}
            for name, (t, ratio) in seconds.items()]


def summarise(rows: list[dict], cost_rows: list[dict]) -> list[dict]:
    """Predicted speed-ups of the last checkpoint (best k), by the paper's formula and with the measured verify, from
    the teacher-forced alpha (fp32 draft) and from the engine's (the 4-bit native draft it really runs)."""
    rel = {r["step"]: r["relative to the target's step"] for r in cost_rows}
    verify = {1: 1.0} | {j: rel[f"verify {j}"] for j in range(2, 9)}
    out = []
    for group in ("input-grounded", "open-ended"):
        for label, name in (("", "draft"), (", small vocab", "draft, small vocab")):
            for source, key in (("teacher-forced", f"{group} alpha{label}"), ("engine", f"{group} engine alpha{label}")):
                if key not in rows[-1]:
                    continue
                alpha, c = rows[-1][key], rel[name]
                paper, k_paper = best_speedup(alpha, c)
                ours, k_ours = best_speedup(alpha, c, verify)
                out.append({"group": group, "draft": name, "alpha from": source, "alpha": alpha, "c": c,
                            "speed-up, paper's formula (verify = 1 step)": f"{paper:.2f}x (k={k_paper})",
                            "speed-up with the measured verify cost": f"{ours:.2f}x (k={k_ours})",
                            "break-even alpha (measured verify)": break_even_alpha(c, verify)})
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", default="0,6,12,18,24,29", help="teacher layers the student keeps")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--every", type=int, default=50)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--prompts", type=int, default=400, help="distillation prompts")
    p.add_argument("--answered", type=int, default=400, help="how many of them get the teacher's greedy answer")
    p.add_argument("--vocab", type=int, default=8192, help="the frequent-token draft's vocabulary")
    p.add_argument("--per-kind", type=int, default=2, help="benchmark prompts per task kind for the acceptance")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--run-dir", default=str(RUN), help="where data, init, checkpoints and the draft go")
    p.add_argument("--stage", choices=["all", "data", "init", "distill", "measure", "cost", "draft", "plot"],
                   default="all")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    layers = [int(v) for v in args.layers.split(",")]
    root = Path(args.run_dir)
    root.mkdir(parents=True, exist_ok=True)
    data, init, run = root / "data.jsonl", root / "init", root / "run"
    if args.stage in ("all", "data"):
        make_data(data, args.prompts, args.answered)
    if args.stage in ("all", "init"):
        make_init(init, layers)
    if args.stage in ("all", "distill"):
        from llmlab.cli.main import main as llmlab_main
        command = distill_command(data, init, run, args.steps, args.every, args.lr)
        print("llmlab " + " ".join(command), flush=True)
        t0 = time.perf_counter()
        code = llmlab_main(command + (["--resume"] if (run / "checkpoints").exists() else []))
        print(f"distill: exit {code}, {time.perf_counter() - t0:.0f} s", flush=True)
    if args.stage in ("all", "draft"):
        from llmlab.checkpoint.load import load_checkpoint
        from llmlab.train.distill import save_draft
        tokenizer = load_checkpoint(init)[1]
        step, weights = checkpoints(run)[-1]
        path = save_draft(student_at(init, weights), draft_vocab(data, tokenizer, args.vocab), root / "draft", tokenizer)
        print(f"wrote {path} (step {step}, {args.vocab} tokens): --speculate draft:{path}", flush=True)
    setting = (f"Draft: SmolLM2-135M-Instruct layers {layers} (of 30), distilled with token-level KL on {args.prompts} "
               f"prompts (less those quoting a benchmark passage) and SmolLM2's greedy answers; 'small vocab': the "
               f"same draft knowing only {args.vocab} tokens (the data's most frequent, then the lowest other ids). Target: SmolLM2 default (native Q4_1) path, greedy, "
               f"{args.new_tokens} new tokens on benchmarks/speculative.py's prompts ({args.per_kind} per kind).")
    if args.stage in ("all", "measure"):
        rows, coverage = measure(root, init, run, args)
        write_results(RESULTS, "acceptance", rows, setting + f" {coverage:.1%} of the target's answer tokens are in "
                      f"the small vocabulary. alpha = teacher-forced on the target's greedy answers (= a greedy "
                      f"draft's chance to be kept); 'engine' = SpeculativeDecoder, k={DRAFT_TOKENS}, never off. "
                      f"Paper: {PAPER}.")
    if args.stage in ("all", "cost"):
        write_results(RESULTS, "cost", costs(root, init, run, args), "Native decode steps, ONE thread, medians of 15 "
                      "alternating rounds of 20 steps (ratio: to the same round's target step) at position ~300, measured on a shared, loaded machine: "
                      "ratios only.")
    if args.stage in ("all", "measure", "cost", "plot"):
        rows = json.loads((RESULTS / "acceptance.json").read_text())["rows"]
        cost_file = RESULTS / "cost.json"
        summary = summarise(rows, json.loads(cost_file.read_text())["rows"]) if cost_file.is_file() else []
        if summary:
            write_results(RESULTS, "speedup", summary, setting + " Predicted from alpha (acceptance.md) and the "
                          "measured step costs (cost.md): the paper's (1 - a^(k+1)) / ((1 - a)(c k + 1)), and with the "
                          "measured cost of a (k + 1)-row verify in place of the 1.")
        small = [r for r in summary if r["draft"] == "draft, small vocab"]
        plot(RESULTS / "acceptance.png", rows, f"{len(layers)}-layer SmolLM2 draft for SmolLM2-135M-Instruct",
             small[0]["break-even alpha (measured verify)"] if small else None)


if __name__ == "__main__":
    main()
