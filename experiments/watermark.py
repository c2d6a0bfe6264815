"""The green-list watermark on SmolLM2-135M-Instruct: detection z against text length, sampling temperature and
edits (a share of tokens replaced at random; a paraphrase by the model), for the paper's lefthash (h=1) and the
self-hash scheme (h=4); quality cost as perplexity under the unwatermarked model. gamma 0.25, delta 2.

Kirchenbauer et al. (2023) watermarked OPT-1.3B on C4 news openings, T = 200 +- 5 tokens, multinomial sampling,
and detect at z > 4; the issue's target is that setting: z > 4 at ~200 tokens with gamma 0.25, delta 2.
Here: chat answers to 12 everyday prompts, stop tokens suppressed so every answer has exactly the asked length.

    python experiments/watermark.py [--n 12] [--tokens 200] [--out experiments/results/watermark]
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import save_figure, write_results  # noqa: E402

import llmlab  # noqa: E402
from llmlab.client import GenParams, LocalClient  # noqa: E402
from llmlab.safety.stats import bootstrap_mean_interval, wilson_interval  # noqa: E402
from llmlab.safety.watermark import PROMPTS, WatermarkConfig, detect_ids, sample  # noqa: E402

KEY = "experiment-key"
PAPER = ("Paper (Kirchenbauer et al. 2023): OPT-1.3B continuations of C4 news, T = 200 +- 5 tokens, multinomial "
         "sampling, gamma 0.25, delta 2, detected at z > 4 (one-sided false-positive rate 3e-5); the issue's target "
         "is z > 4 at ~200 tokens.")


def summary(zs: list[float]) -> dict:
    n, hit = len(zs), sum(z > 4 for z in zs)
    lo, hi = wilson_interval(hit, n)
    z_lo, z_hi = bootstrap_mean_interval(zs)
    return {"mean z": round(float(np.mean(zs)), 2), "mean z 95% bootstrap": f"[{z_lo:.2f}, {z_hi:.2f}]",
            "min z": round(float(np.min(zs)), 2),
            "z > 4": f"{hit}/{n} [{lo:.2f}, {hi:.2f}]"}


def perplexity(client: LocalClient, llm, prompts: list[str], completions) -> float:
    """Mean per-text perplexity of the answers given their prompts, under the unwatermarked model."""
    pairs = [(client.chat_text(p), llm.tokenizer.decode(c.token_ids)) for p, c in zip(prompts, completions)]
    return float(np.mean([math.exp(-ll.logprob / ll.n_tokens) for ll in client.loglikelihood(pairs)]))


def replace_share(ids: list[int], share: float, vocab: int, rng: np.random.Generator) -> list[int]:
    """An attacker's edit: a share of the tokens replaced by tokens drawn uniformly from the vocabulary."""
    out = list(ids)
    for i in rng.choice(len(ids), int(round(share * len(ids))), replace=False):
        out[i] = int(rng.integers(0, vocab))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=12, help="prompts (at most 12)")
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--temperatures", default="0.2,0.7,1.0,1.3", help="comma-separated; 0.2 runs with top-p 0.9 "
                                                                      "(the model's default)")
    ap.add_argument("--out", default="experiments/results/watermark")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    llm = llmlab.load("smollm2", dtype=torch.float32)
    client = LocalClient(llm)
    prompts = PROMPTS[:args.n]
    left, selfh = WatermarkConfig(KEY), WatermarkConfig(KEY, context_width=4, scheme="selfhash")
    out = Path(args.out)

    # 1. length: z of the first L tokens of each answer, watermarked and plain, at temperature 1
    gens = {"lefthash h=1": sample(llm, prompts, left, args.tokens, temperature=1.0, seed=0),
            "selfhash h=4": sample(llm, prompts, selfh, args.tokens, temperature=1.0, seed=0),
            "plain": sample(llm, prompts, None, args.tokens, temperature=1.0, seed=0)}
    configs = {"lefthash h=1": left, "selfhash h=4": selfh, "plain": left}
    rows = []
    for length in [n for n in (25, 50, 100, 150, 200, 300) if n <= args.tokens]:
        for name, done in gens.items():
            zs = [detect_ids(c.token_ids[:length], configs[name])["z"] for c in done]
            rows.append({"tokens": length, "text": name, **summary(zs)})
    write_results(out, "length", rows, f"SmolLM2-135M-Instruct, {len(prompts)} chat answers per row, temperature 1, "
                  f"gamma 0.25, delta 2; 'plain' is scored with the lefthash key. 95% Wilson intervals. {PAPER}")
    plot_length(out / "length.png", rows)

    # 2. temperature (and the model's own default, 0.2 with top-p 0.9), with the quality cost
    rows = []
    for t in [float(x) for x in args.temperatures.split(",")]:
        label, top_p = ("0.2, top-p 0.9 (model default)", 0.9) if t == 0.2 else (f"{t:g}", 1.0)
        marked = gens["lefthash h=1"] if t == 1.0 else sample(llm, prompts, left, args.tokens, t, 0, top_p)
        plain = gens["plain"] if t == 1.0 else sample(llm, prompts, None, args.tokens, t, 0, top_p)
        rows.append({"temperature": label, **summary([detect_ids(c.token_ids, left)["z"] for c in marked]),
                     "ppl watermarked": round(perplexity(client, llm, prompts, marked), 2),
                     "ppl plain": round(perplexity(client, llm, prompts, plain), 2)})
    write_results(out, "temperature", rows, f"lefthash h=1, {args.tokens} tokens; perplexity of the answers given "
                  "their prompts under the unwatermarked SmolLM2 (the quality cost).")

    # 3. edits: a share of tokens replaced at random, and a paraphrase by the model itself (unwatermarked)
    rng = np.random.default_rng(0)
    vocab = llm.tokenizer.vocab_size
    rows = []
    for share in (0.0, 0.1, 0.2, 0.3, 0.5):
        for name in ("lefthash h=1", "selfhash h=4"):
            zs = [detect_ids(replace_share(c.token_ids, share, vocab, rng), configs[name])["z"] for c in gens[name]]
            rows.append({"edit": f"{share:.0%} tokens replaced", "scheme": name, **summary(zs)})
    for name in ("lefthash h=1", "selfhash h=4"):
        texts = [llm.tokenizer.decode(c.token_ids) for c in gens[name]]
        asks = [f"Paraphrase the following text in your own words.\n\n{t}" for t in texts]
        para = client.generate(asks, GenParams(max_tokens=args.tokens + 50, temperature=0.7, seed=0))
        zs = [detect_ids(llm.tokenizer.encode(p.text), configs[name])["z"] if len(llm.tokenizer.encode(p.text)) > 8
              else 0.0 for p in para]
        rows.append({"edit": "paraphrased by SmolLM2 (T 0.7)", "scheme": name, **summary(zs)})
    write_results(out, "edits", rows, f"{args.tokens}-token watermarked answers at temperature 1, then edited.")
    for name in ("length", "temperature", "edits"):
        print((out / f"{name}.md").read_text())


def plot_length(path: Path, rows: list[dict]):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name in dict.fromkeys(r["text"] for r in rows):
        sel = [r for r in rows if r["text"] == name]
        ax.plot([r["tokens"] for r in sel], [r["mean z"] for r in sel], marker="o", label=name)
    ax.axhline(4, color="gray", ls=":", label="z = 4: the paper's threshold, its target at ~200 tokens")
    ax.set_xlabel("tokens scored")
    ax.set_ylabel("mean z")
    ax.set_title("Watermark z vs length (SmolLM2, γ 0.25, δ 2)", fontsize=10)
    ax.legend(fontsize=7)
    save_figure(fig, path)


if __name__ == "__main__":
    main()
