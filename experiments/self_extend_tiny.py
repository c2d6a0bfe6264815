"""Self-Extend on a tiny model trained for it: passkey retrieval at 1x-8x a short trained context.

    nice -n 19 .venv/bin/python experiments/self_extend_tiny.py [--steps 600] [--eval-only]

SmolLM2-135M barely retrieves a needle inside its own 8k context and a 16k prefill costs minutes of one core, so
"NIAH at 2x the trained context retrieves with Self-Extend where it fails without" cannot be tested on it. This
trains a tiny Llama (llmlab's Transformer with the `tiny` preset, RoPE; llmlab's SFT objective and training loop;
one thread, seeded) on the passkey test of Mohtashami & Jaggi 2023, which the Self-Extend paper uses
(llmlab.eval.niah.passkey_prompt: a header, filler sentences with "The pass key is 42. Remember it. 42 is the pass
key." at a random depth, "What is the pass key? The pass key is "), every prompt within TRAINED tokens, loss on the
key only; its byte-level BPE has the numbers 10-99 as single tokens. The checkpoint goes to
tests/data/self_extend_tiny/ (HF layout, safetensors), which tests/test_self_extend_niah.py loads. Then it measures
retrieval by prompt length (1x, 2x, 4x, 8x the trained context) and depth with no extension, Self-Extend, YaRN, NTK and
linear scaling, through llmlab.load and the engine, and writes
experiments/results/self_extend_tiny/{passkey.md,passkey.json,heatmap.png}.

(A first version trained on `llmlab eval niah`'s chat prompts, whose codes like amber-123 take 5-7 tokens to copy:
neither 350 steps on the answers alone nor 550 with an added copy task meant to form induction heads left chance
level, about 10 minutes of a loaded core. A one-token key is retrieved by a single attention head and is learnt in
about 200 steps.)
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import save_figure  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CKPT = ROOT / "tests" / "data" / "self_extend_tiny"
RESULTS = Path(__file__).parent / "results" / "self_extend_tiny"
TRAINED = 128  # the model's context: every training prompt and its key fit in it
ROOM = 48  # prompt tokens besides the filler and needle (header, question), and the key
WINDOW = 32  # Self-Extend neighbours at true distance
PAPER = ("Self-Extend (Jin et al. 2024): Llama-2-7B-chat retrieves the passkey at every depth up to 16k (4x its "
         "trained 4k) with group 4-16 and window 512-2048, no training; without it, nothing past 4k")
METHODS = ("none", "self-extend", "yarn", "ntk", "linear")
FACTORS = {"1x": 1, "2x": 2, "4x": 4, "8x": 8}


def filler_tokens(label: str) -> int:
    """Filler tokens (needle included) of a prompt that fills about FACTOR x the trained context."""
    return FACTORS[label] * TRAINED - ROOM


def make_tokenizer(out: Path):
    """A small byte-level BPE trained on the filler, the passkey sentences and the numbers 10-99 (one token each)."""
    from llmlab.eval.niah import FILLER, PASSKEY_HEADER, PASSKEY_QUESTION
    from llmlab.tokenizer import Tokenizer
    from llmlab.tokenizer.train import train_bpe
    texts = FILLER * 20 + [PASSKEY_HEADER + PASSKEY_QUESTION] * 20
    texts += [f"The pass key is {k}. Remember it. {k} is the pass key." for k in range(10, 100)] * 60
    return Tokenizer.from_dir(train_bpe(texts, 640, out, min_frequency=2, model_max_length=TRAINED))


def passkey_example(tokenizer, count, rng: random.Random) -> tuple[list[int], list[bool]]:
    """(ids, loss mask) of one passkey prompt of random length and depth, and its key (the only loss)."""
    from llmlab.eval.niah import passkey_prompt
    prompt, key = passkey_prompt(count, rng.randint(16, filler_tokens("1x")), rng.random(), rng.randrange(10**9))
    ids, answer = tokenizer.encode(prompt), tokenizer.encode(key)
    assert len(answer) == 1, f"the key {key} is not one token"
    return ids + answer, [False] * len(ids) + [True]


def train_tiny(steps: int, seed: int, out: Path) -> dict:
    """Train the tiny passkey retriever with llmlab's SFT objective and loop; save it to out."""
    from llmlab.checkpoint.hf import save_hf_dir
    from llmlab.model import ModelConfig, Transformer
    from llmlab.train.config import PRESETS, TrainConfig
    from llmlab.train.loop import train
    from llmlab.train.sft import sft_objective

    work = Path(tempfile.mkdtemp(prefix="self_extend_tiny_"))
    print(f"training in {work}", flush=True)
    tokenizer = make_tokenizer(work / "tok")
    cache: dict[str, int] = {}

    def count(text: str) -> int:  # haystack() counts sentence by sentence: the 12 filler sentences repeat
        if text not in cache:
            cache[text] = len(tokenizer.encode(text))
        return cache[text]

    cfg = TrainConfig(out_dir=str(work / "run"), seed=seed, seq_len=TRAINED, micro_batch=32, max_steps=steps,
                      lr=3e-3, min_lr=3e-4, warmup_steps=30, weight_decay=0.0, dtype="float32", threads=1,
                      eval_every=0, save_every=0, progress=False, peak_flops=1e12, log_every=25)
    rng = random.Random(seed)
    examples = [passkey_example(tokenizer, count, rng) for _ in range(steps * cfg.micro_batch)]
    assert max(len(ids) for ids, _ in examples) <= TRAINED
    mcfg = ModelConfig(vocab_size=tokenizer.vocab_size, max_seq_len=TRAINED, **PRESETS["tiny"],
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = Transformer(mcfg).init_weights(seed=seed)
    t0 = time.perf_counter()
    result = train(model, sft_objective(examples, tokenizer, cfg, pack=False), cfg)
    seconds = time.perf_counter() - t0
    log = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    save_hf_dir(result.model.eval(), out, tokenizer=tokenizer)
    return {"steps": steps, "rows_per_step": cfg.micro_batch, "seconds": round(seconds),
            "params": sum(p.numel() for p in model.parameters()), "final_loss": round(log[-1]["loss"], 4)}


def self_extend_group(need: int, window: int = WINDOW) -> int:
    """The smallest group in 2, 4, 8, 16 whose reach, (trained - window + window // group) * group, covers need."""
    for group in (2, 4, 8, 16):
        if (TRAINED - window + window // group) * group >= need:
            return group
    return 16


def load_for(path: Path, method: str, label: str):
    """(LLM whose context covers FACTOR x TRAINED by `method`, what was done). none: the context limit is lifted
    and nothing else, so positions past the trained ones are extrapolated."""
    import llmlab
    need = FACTORS[label] * TRAINED
    if method == "none":
        from llmlab.api import LLM
        from llmlab.checkpoint.load import load_checkpoint
        model, tokenizer, where = load_checkpoint(path)
        model.config.max_seq_len = need
        return LLM(model, tokenizer, where), "none"
    if method == "self-extend":
        spec = f"{self_extend_group(need)},{WINDOW}"
        return llmlab.load(path, self_extend=spec, announce=False), f"self-extend {spec}"
    factor = FACTORS[label]
    return llmlab.load(path, rope_scaling=f"{method}:{factor}", announce=False), f"{method}:{factor}"


def evaluate(path: Path, samples: int, depths: list[float]) -> list[dict]:
    """Exact retrieval per (method, length, depth) over `samples` keys per cell (llmlab.eval.niah.run_passkey)."""
    from llmlab.eval.niah import run_passkey
    rows = []
    for label in FACTORS:
        for method in METHODS:
            if label == "1x" and method != "none":
                continue  # inside the trained context there is nothing to extend
            llm, how = load_for(path, method, label)
            t0 = time.perf_counter()
            accuracy = run_passkey(llm, filler_tokens(label), depths, samples)
            rows += [{"method": method, "how": how, "length": label, "depth": d, "exact": a}
                     for d, a in zip(depths, accuracy)]
            print(f"{label} {how:18s} exact {sum(accuracy) / len(accuracy):.2f} "
                  f"({time.perf_counter() - t0:.1f} s)", flush=True)
    return rows


def write(out: Path, rows: list[dict], training: dict | None, samples: int):
    from llmlab.io import atomic_write_text
    out.mkdir(parents=True, exist_ok=True)
    labels = list(FACTORS)
    lines = [f"Tiny Llama (RoPE, {TRAINED}-token context) trained on passkey retrieval; exact retrieval over "
             f"{samples} keys per depth, {len({r['depth'] for r in rows})} depths (random guess: 1/90).",
             f"Paper: {PAPER}.", f"Training: {json.dumps(training)}" if training else "", "",
             "| method | " + " | ".join(f"{lab} ({FACTORS[lab] * TRAINED} tokens)" for lab in labels) + " |",
             "|---|" + "---:|" * len(labels)]
    for method in METHODS:
        cells = []
        for lab in labels:
            r = [x for x in rows if x["method"] == method and x["length"] == lab]
            cells.append(f"{sum(x['exact'] for x in r) / len(r):.2f} ({r[0]['how']})" if r else "-")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    atomic_write_text(out / "passkey.md", "\n".join(lines) + "\n")
    atomic_write_text(out / "passkey.json", json.dumps({"trained": TRAINED, "training": training,
                                                        "samples": samples, "rows": rows}, indent=2) + "\n")
    plot(out / "heatmap.png", rows, labels)


def plot(path: Path, rows, labels):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    depths = sorted({r["depth"] for r in rows})
    fig, axes = plt.subplots(1, len(METHODS), figsize=(2.4 * len(METHODS), 2.9), squeeze=False)
    for ax, m in zip(axes[0], METHODS):
        grid = [[next((r["exact"] for r in rows if r["method"] == m and r["length"] == lab and r["depth"] == d),
                      float("nan")) for lab in labels] for d in depths]
        ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")  # not run: blank
        for i, line in enumerate(grid):
            for j, value in enumerate(line):
                if value == value:
                    ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7)
        ax.set_xticks(range(len(labels)), labels)
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
        ax.set_title(m, fontsize=9)
        ax.set_xlabel("prompt / trained context")
    axes[0][0].set_ylabel("needle depth")
    fig.suptitle(f"Tiny Llama passkey retrieval, exact (trained context {TRAINED} tokens; 1x: no extension)",
                 fontsize=9)
    save_figure(fig, path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--samples", type=int, default=20, help="keys per (method, length, depth) cell")
    p.add_argument("--depths", default="0.1,0.3,0.5,0.7,0.9")
    p.add_argument("--ckpt", default=str(CKPT))
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--eval-only", action="store_true", help="measure the checkpoint already at --ckpt")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    training = None
    if not args.eval_only:
        training = train_tiny(args.steps, args.seed, Path(args.ckpt))
        print(f"trained: {training}", flush=True)
    elif (Path(args.out) / "passkey.json").is_file():
        training = json.loads((Path(args.out) / "passkey.json").read_text()).get("training")
    depths = [float(d) for d in args.depths.split(",")]
    write(Path(args.out), evaluate(Path(args.ckpt), args.samples, depths), training, args.samples)


if __name__ == "__main__":
    main()
