"""Lost in the middle (Liu et al. 2023) on SmolLM2-135M-Instruct with bios-world passages: answer accuracy against
the position of the one passage that holds the answer among k passages (the others: biographies of other people).

    python experiments/rag_lost_in_middle.py [--k 5] [--n 40] [--model smollm2] [--out experiments/results/rag_lost_in_middle]

Accuracy is Liu et al.'s: the gold answer appears in the greedy answer. Also closed-book (no passage) and oracle
(only the gold passage). Every accuracy comes with a Wilson 95% interval over the n questions.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import save_figure, write_results  # noqa: E402

# Liu et al.'s instruction (their Figure 2), with the passages as numbered documents
PROMPT = ("Write a high-quality answer for the given question using only the provided search results (some of which "
          "might be irrelevant).\n\n{documents}\n\nQuestion: {question}\nAnswer:")
CLOSED_BOOK = "Answer the question.\n\nQuestion: {question}\nAnswer:"
# Liu et al. 2023, GPT-3.5-Turbo on NaturalQuestions: 56.1% closed-book, 88.3% oracle; with 20 documents about 76%
# with the answer first and about 54% with it 10th, below closed-book (read from their Figure 5; approximate)
PAPER = {"model": "GPT-3.5-Turbo, 20 documents (Liu et al. 2023)", "first": 0.76, "middle": 0.54, "last": 0.63,
         "closed_book": 0.561, "oracle": 0.883}


def items(n: int, k: int, seed: int) -> list[dict]:
    """n questions, each with its gold biography and k-1 biographies of other people."""
    from llmlab.data.bios import make_bios_world

    world = make_bios_world(max(200, n + k), seed=seed)
    bios = dict(zip((p.name for p in world.people), world.biographies()))
    rng = random.Random(f"{seed}/litm")
    out = []
    for person in rng.sample(world.people, n):
        qa = rng.choice([q for q in world.qa("all") if q["person"] == person.name])
        others = rng.sample([name for name in bios if name != person.name], k - 1)
        out.append({"question": qa["question"], "answer": qa["answer"], "gold": bios[person.name],
                    "distractors": [bios[o] for o in others]})
    return out


def documents(passages: list[str]) -> str:
    return "\n".join(f"Document [{i}] {p}" for i, p in enumerate(passages, start=1))


def accuracy(client, prompts: list[str], answers: list[str], max_tokens: int) -> tuple[float, list[bool]]:
    from llmlab.client import GenParams
    from llmlab.rag.faithfulness import answer_correct

    replies = client.generate(prompts, GenParams(max_tokens=max_tokens, temperature=0, seed=0))
    correct = [answer_correct(r.text, [a]) for r, a in zip(replies, answers)]
    return sum(correct) / len(correct), correct


def plot(path: Path, rows: list[dict], k: int, n: int):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pos = [r for r in rows if isinstance(r["position"], int)]
    x = [r["position"] for r in pos]
    y = [r["accuracy"] for r in pos]
    # max(0, .): Wilson's bound at 0 of n comes out a rounding error above 0
    err = [[max(0.0, r["accuracy"] - r["ci_low"]) for r in pos], [max(0.0, r["ci_high"] - r["accuracy"]) for r in pos]]
    fig, ax = plt.subplots(figsize=(6, 3.8))
    ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=f"SmolLM2-135M, {k} passages")
    # the paper's first / middle / last of 20 documents, drawn at our first / middle / last position
    ax.plot([1, (k + 1) / 2, k], [PAPER["first"], PAPER["middle"], PAPER["last"]], marker="s", color="tab:red",
            alpha=0.6, label=f"{PAPER['model']} (first/middle/last)")
    for r, style in zip([r for r in rows if not isinstance(r["position"], int)], ("--", ":")):
        ax.axhline(r["accuracy"], linestyle=style, color="gray", label=f"{r['position']} ({r['accuracy']:.2f})")
    ax.set_xticks(x)
    ax.set_xlabel("position of the passage with the answer")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.05)
    ax.set_title(f"Lost in the middle, bios world (n={n} per point, 95% Wilson)")
    ax.legend(fontsize=8)
    save_figure(fig, path)


def paper_beside(rows: list[dict], k: int) -> list[dict]:
    """Each row with the paper's accuracy at the matching place (first, middle, last position; closed-book; oracle)."""
    where = {1: "first", k: "last", "closed-book": "closed_book", "oracle": "oracle"}
    if k % 2:
        where[(k + 1) // 2] = "middle"
    return [{**r, "paper": PAPER[where[r["position"]]] if r["position"] in where else ""} for r in rows]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--k", type=int, default=5, help="passages in the context")
    p.add_argument("--n", type=int, default=40, help="questions (each asked at every position)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="experiments/results/rag_lost_in_middle")
    p.add_argument("--from-json", action="store_true", help="rewrite the table and plot of the finished run in --out")
    args = p.parse_args()
    if args.from_json:
        import json
        saved = json.loads((Path(args.out) / "rag_lost_in_middle.json").read_text())
        rows = [{k: v for k, v in r.items() if k != "paper"} for r in saved["rows"]]
        write_results(args.out, "rag_lost_in_middle", paper_beside(rows, args.k), saved["note"])
        plot(Path(args.out) / "rag_lost_in_middle.png", rows, args.k, args.n)
        return

    import llmlab
    from llmlab.client import LocalClient
    from llmlab.safety.stats import wilson_interval

    t0 = time.perf_counter()
    client = LocalClient(llmlab.load(args.model))
    qs = items(args.n, args.k, args.seed)
    answers = [q["answer"] for q in qs]
    rows = []

    def row(position, prompts):
        acc, correct = accuracy(client, prompts, answers, args.max_tokens)
        lo, hi = wilson_interval(sum(correct), len(correct))
        rows.append({"position": position, "accuracy": acc, "ci_low": lo, "ci_high": hi, "n": len(correct)})
        print(rows[-1], flush=True)

    for position in range(1, args.k + 1):
        row(position, [PROMPT.format(documents=documents(q["distractors"][:position - 1] + [q["gold"]]
                                                         + q["distractors"][position - 1:]), question=q["question"])
                       for q in qs])
    row("closed-book", [CLOSED_BOOK.format(question=q["question"]) for q in qs])
    row("oracle", [PROMPT.format(documents=documents([q["gold"]]), question=q["question"]) for q in qs])
    out = Path(args.out)
    note = (f"SmolLM2-135M-Instruct ({args.model}), bios world, {args.n} questions, {args.k} passages (one with the "
            f"answer, the others other people's biographies), greedy, {args.max_tokens} tokens; accuracy = gold "
            f"answer in the reply; Wilson 95% intervals; {time.perf_counter() - t0:.0f} s on a shared 2-core CPU.\n\n"
            f"Paper: {PAPER['model']}: first {PAPER['first']:.2f}, middle {PAPER['middle']:.2f}, last "
            f"{PAPER['last']:.2f}, closed-book {PAPER['closed_book']:.3f}, oracle {PAPER['oracle']:.3f} "
            "(positions and closed-book/oracle as reported; first/middle/last read from their Figure 5).")
    write_results(out, "rag_lost_in_middle", paper_beside(rows, args.k), note)
    plot(out / "rag_lost_in_middle.png", rows, args.k, args.n)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
