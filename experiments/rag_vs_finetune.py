"""RAG against finetuning for knowledge SmolLM2-135M-Instruct has never seen: the bios world's fictional people.

    python experiments/rag_vs_finetune.py [--people 30] [--steps 40] [--out experiments/results/rag_vs_finetune]

As Ovadia et al. 2023 ("Fine-Tuning or Retrieval?"): knowledge is measured by 4-way multiple choice (the option
with the highest log-likelihood after the question; the 3 wrong options are other values of the same attribute,
so only knowing the person tells them apart; chance 0.25). Four models:
  base          SmolLM2 as it is (closed book)
  base + RAG    the question with the top-k passages of an llmlab index (hybrid search) over the biographies
  finetuned     a short full SFT with llmlab.train on the biographies ("Tell me about NAME." -> a biography; several
                differently worded biographies per person, the paraphrase augmentation Ovadia et al. found to help)
  finetuned + RAG
Accuracies over every (person, attribute) question, with Wilson 95% intervals.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import bar_plot, write_results  # noqa: E402

QUESTION = "{passages}Question: {question}\nAnswer with the value only."
PAPER = ("Ovadia et al. 2023: RAG beat unsupervised finetuning for new knowledge on every model they tried (current-events "
         "multiple choice, Llama2-7B, Mistral-7B, Orca2-7B), and finetuning + RAG was not reliably better than RAG alone.")


def mc_items(world, seed: int) -> list[dict]:
    """Every (person, attribute) question with its answer and 3 wrong values of the same attribute, drawn from
    the values of a larger world (a small world may not have 3 other values of an attribute)."""
    from llmlab.data.bios import ATTRIBUTES, make_bios_world

    people = world.people + make_bios_world(200, seed=seed + 1000).people
    pool = {a: sorted({getattr(p, a) for p in people}) for a in ATTRIBUTES}
    rng = random.Random(f"{seed}/mc")
    out = []
    for qa in world.qa("all"):
        options = [qa["answer"]] + rng.sample([v for v in pool[qa["attribute"]] if v != qa["answer"]], 3)
        rng.shuffle(options)
        out.append({**qa, "options": options, "gold": options.index(qa["answer"])})
    return out


def mc_accuracy(client, items: list[dict], passages: list[str] | None) -> tuple[float, int]:
    """Share of items whose highest-likelihood option is the gold one."""
    pairs, spans = [], []
    for i, it in enumerate(items):
        context = f"{passages[i]}\n\n" if passages else ""
        prompt = client.chat_text(QUESTION.format(passages=context, question=it["question"]))
        spans.append(len(pairs))
        pairs += [(prompt, option) for option in it["options"]]
    lls = [x.logprob for x in client.loglikelihood(pairs)]
    right = sum(max(range(4), key=lambda j: lls[s + j]) == it["gold"] for s, it in zip(spans, items))
    return right / len(items), right


def finetune(model_name: str, world, args, out_dir: Path):
    """A full SFT of the model on its biographies; returns the trained LLM."""
    from llmlab.api import LLM
    from llmlab.checkpoint.load import load_checkpoint
    from llmlab.train.chat_data import conversations_to_examples
    from llmlab.train.config import TrainConfig
    from llmlab.train.loop import train
    from llmlab.train.sft import prepare_model, sft_objective

    model, tokenizer, _ = load_checkpoint(model_name)
    model = prepare_model(model.float(), None)
    copies = args.paraphrases
    bios = list(world.biographies(augment="multi", multi=copies) if copies > 1 else world.biographies())
    convs = [[{"role": "user", "content": f"Tell me about {world.people[i // copies].name}."},
              {"role": "assistant", "content": bio}] for i, bio in enumerate(bios)]
    cfg = TrainConfig(out_dir=str(out_dir), seq_len=256, micro_batch=args.micro_batch, max_steps=args.steps, lr=args.lr,
                      min_lr=args.lr / 10, warmup_steps=max(1, args.steps // 10), weight_decay=0.0, eval_every=0,
                      save_every=0, progress=False, threads=args.threads, peak_flops=1e12, keep_last=1)
    t0 = time.perf_counter()
    model = train(model, sft_objective(conversations_to_examples(convs, tokenizer), tokenizer, cfg), cfg).model
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    print(f"finetuned on {len(convs)} biographies, {args.steps} steps, {time.perf_counter() - t0:.0f} s", flush=True)
    return LLM(model, tokenizer), len(convs)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--people", type=int, default=30)
    p.add_argument("--paraphrases", type=int, default=4, help="differently worded biographies per person")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--k", type=int, default=2, help="passages retrieved for RAG")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="experiments/results/rag_vs_finetune")
    args = p.parse_args()

    import llmlab
    from llmlab.client import LocalClient
    from llmlab.data.bios import make_bios_world
    from llmlab.rag.embed import Embedder
    from llmlab.rag.index import RagIndex, build_index
    from llmlab.safety.stats import wilson_interval

    t0 = time.perf_counter()
    world = make_bios_world(args.people, seed=args.seed + 1)
    items = mc_items(world, args.seed)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "bios.jsonl"
        corpus.write_text("".join(json.dumps({"id": p.name, "text": b}) + "\n"
                                  for p, b in zip(world.people, world.biographies())))
        embedder = Embedder()
        build_index([str(corpus)], Path(tmp) / "index", embedder=embedder)
        index = RagIndex.load(Path(tmp) / "index")
        hits = [index.search(it["question"], k=args.k, embedder=embedder) for it in items]
        passages = ["\n\n".join(h.chunk.text for h in hs) for hs in hits]
        recall = sum(any(h.chunk.doc_id == it["person"] for h in hs) for hs, it in zip(hits, items)) / len(items)

        def evaluate(name, client):
            for label, ctx in ((name, None), (f"{name} + RAG", passages)):
                acc, right = mc_accuracy(client, items, ctx)
                lo, hi = wilson_interval(right, len(items))
                rows.append({"model": label, "accuracy": acc, "ci_low": lo, "ci_high": hi, "n": len(items)})
                print(rows[-1], flush=True)

        evaluate("base", LocalClient(llmlab.load(args.model)))
        llm, n_docs = finetune(args.model, world, args, Path(tmp) / "sft")
        evaluate("finetuned", LocalClient(llm))
    out = Path(args.out)
    note = (f"{args.people} fictional people x 6 attributes = {len(items)} 4-way multiple-choice questions; finetuning: "
            f"full SFT of {args.model} on {n_docs} biographies ({args.paraphrases} wordings per person), {args.steps} "
            f"steps x {args.micro_batch} rows x 256 tokens, lr {args.lr}; RAG: top-{args.k} hybrid passages (the "
            f"person's biography among them for {recall:.0%} of questions). Wilson 95% intervals; "
            f"{time.perf_counter() - t0:.0f} s on a shared 2-core CPU.\n\n{PAPER}")
    write_results(out, "rag_vs_finetune", rows, note)
    bar_plot(out / "rag_vs_finetune.png", [r["model"] for r in rows], {"accuracy": [r["accuracy"] for r in rows]},
             f"New facts: RAG vs finetuning (n={len(items)}, chance 0.25)", "4-way MC accuracy")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
