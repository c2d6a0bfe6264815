"""Knowledge storage and extraction (Physics of Language Models, Part 3.1) on the bios world.

Pretrain a small transformer from scratch on biographies of every person, finetune it (SFT) on QA for the
training half of the people, and measure exact-match QA accuracy on the held-out half, once with plain
biographies (one per person, fixed sentence order, pronouns after the first sentence) and once with knowledge
augmentation (several differently worded biographies per person, shuffled sentences, full names). The paper's
finding: without augmentation extraction for held-out people is poor, with augmentation it is high.

Extraction can only be as good as storage, so next to QA accuracy the table reports storage: per attribute,
does the pretrained model complete the attribute's value (greedy, every token right) inside the person's own
biography? Low storage means pretraining was too short to memorize; high storage with low held-out QA is the
paper's effect, knowledge stored but not extractable. A third condition is the paper's alternative to
augmentation, mixed training: plain biographies plus the training people's QA in the pretraining data, and no
SFT stage. All conditions see the same number of pretraining tokens; the SFT conditions the same SFT steps.

    python experiments/knowledge_extraction.py [--people 200] [--pretrain-steps 600] [--sft-steps 200] [--out DIR]
"""

from __future__ import annotations

import argparse
import random
import re
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import bar_plot, write_results  # noqa: E402

from llmlab.data.bios import ATTRIBUTES, QA_CHAT_TEMPLATE, TEMPLATES, make_bios_world  # noqa: E402
from llmlab.model import ModelConfig, Transformer  # noqa: E402
from llmlab.tokenizer import Tokenizer  # noqa: E402
from llmlab.tokenizer.train import train_bpe  # noqa: E402
from llmlab.train.chat_data import conversations_to_examples  # noqa: E402
from llmlab.train.config import TrainConfig  # noqa: E402
from llmlab.train.loop import Objective, train  # noqa: E402
from llmlab.train.pretrain import TokenBatches, lm_loss  # noqa: E402
from llmlab.train.sft import answer, exact_match, sft_objective  # noqa: E402
from llmlab.train.tasks import bios_qa_items  # noqa: E402

AUGMENTED = "multi,permute,fullname"
# name -> (biography augmentation, QA of the training people mixed into pretraining, SFT on that QA afterwards)
CONDITIONS = {
    "no augmentation": (None, False, True),
    "augmented (multi5+permute+fullname)": (AUGMENTED, False, True),
    "mixed training (plain bios + train QA, no SFT)": (None, True, False),
}


# ---- storage: can the model complete a person's attributes inside their own biography? ----------------------


def _template_regex(template: str, attr: str, value: str) -> re.Pattern:
    pattern = re.escape(template)
    for field in ("Name", "name", "Poss", "poss"):
        pattern = pattern.replace(re.escape("{" + field + "}"), ".+?")
    return re.compile(pattern.replace(re.escape("{" + attr + "}"), "(?P<value>" + re.escape(value) + ")"))


def attribute_spans(bio: str, person) -> dict[str, tuple[int, int]]:
    """Character span of each attribute's value in a biography, found by matching its sentences to the templates."""
    spans, start = {}, 0
    for sentence in bio.split(". "):
        sentence = sentence.rstrip(".") + "."
        for attr in ATTRIBUTES:
            value = getattr(person, attr)
            m = next((m for t in TEMPLATES[attr] if (m := _template_regex(t, attr, value).fullmatch(sentence))), None)
            if m is not None:
                spans[attr] = (start + m.start("value"), start + m.end("value"))
                break
        start += len(sentence) + 1
    if set(spans) != set(ATTRIBUTES):
        raise AssertionError(f"could not find every attribute in the biography {bio!r}")
    return spans


def storage_targets(bio: str, person, tokenizer) -> tuple[list[int], dict[str, tuple[int, int]]]:
    """Token ids of the biography (as pretraining saw it: after an end-of-text) and, per attribute, the token
    span of its value. Values start with a letter after a space, so they begin on a pre-token boundary."""
    eos = tokenizer.eos_token_id
    ids = [eos] + tokenizer.encode(bio)
    spans = {}
    for attr, (a, b) in attribute_spans(bio, person).items():
        before, upto = tokenizer.encode(bio[:a - 1]), tokenizer.encode(bio[:b])
        assert ids[1:1 + len(upto)] == upto and upto[:len(before)] == before, "value not on a token boundary"
        spans[attr] = (1 + len(before), 1 + len(upto))
    return ids, spans


@torch.no_grad()
def storage_accuracy(model, tokenizer, world, bios: list[str], owners: list[int], batch: int = 32) -> dict:
    """Per split (train/test people) and attribute: fraction of values the model predicts token for token
    (teacher-forced argmax = greedy completion) from the biography text before them."""
    model.eval()
    hits = {(s, a): [] for s in ("train", "test") for a in ATTRIBUTES}
    examples = [(storage_targets(bio, world.people[p], tokenizer), world.people[p].split) for bio, p in zip(bios, owners)]
    for i in range(0, len(examples), batch):
        chunk = examples[i:i + batch]
        T = max(len(ids) for (ids, _), _ in chunk)
        x = torch.full((len(chunk), T), tokenizer.eos_token_id, dtype=torch.long)
        for r, ((ids, _), _) in enumerate(chunk):
            x[r, :len(ids)] = torch.tensor(ids)
        pred = model(x).argmax(-1)  # pred[:, t] is the guess for token t + 1
        for r, ((ids, spans), split) in enumerate(chunk):
            for attr, (a, b) in spans.items():
                hits[split, attr].append(bool((pred[r, a - 1:b - 1] == x[r, a:b]).all()))
    per = {k: sum(v) / max(1, len(v)) for k, v in hits.items()}
    return {split: sum(per[split, a] for a in ATTRIBUTES) / len(ATTRIBUTES) for split in ("train", "test")} | \
        {f"{split}/{a}": per[split, a] for split in ("train", "test") for a in ATTRIBUTES}


def qa_accuracy(model, tokenizer, items: list[dict]) -> tuple[float, dict]:
    replies = answer(model, tokenizer, [it["messages"] for it in items], max_new_tokens=16)
    per = {a: exact_match([r for r, it in zip(replies, items) if it["attribute"] == a],
                          [it["answer"] for it in items if it["attribute"] == a]) for a in ATTRIBUTES}
    return exact_match(replies, [it["answer"] for it in items]), per


# ---- the experiment -----------------------------------------------------------------------------------------


def pretraining_tokens(docs: list[list[int]], eos: int, n_tokens: int, seed: int) -> np.ndarray:
    """Documents (each ending with end-of-text) in a fresh random order every epoch, until n_tokens are covered."""
    rng, out, total = random.Random(seed), [], 0
    while total < n_tokens + 1:
        order = list(range(len(docs)))
        rng.shuffle(order)
        for i in order:
            out.append(docs[i] + [eos])
            total += len(docs[i]) + 1
    return np.array([t for d in out for t in d], dtype=np.int32)


def run(people: int = 200, pretrain_steps: int = 600, sft_steps: int = 200, dim: int = 128, layers: int = 4,
        seq_len: int = 128, micro_batch: int = 16, out: str | Path = "experiments/results/knowledge",
        threads: int = 1, seed: int = 0, conditions: list[str] | None = None, lr: float = 2e-3,
        dtype: str = "bfloat16", cache: str | Path | None = None) -> list[dict]:
    out = Path(out)
    torch.set_num_threads(threads)
    world = make_bios_world(people, seed=seed)
    train_items, test_items = bios_qa_items(world, "train"), bios_qa_items(world, "test")
    texts = list(world.biographies(AUGMENTED)) + [f"{it['messages'][0]['content']} {it['answer']}"
                                                   for it in train_items + test_items]
    tokenizer = Tokenizer.from_dir(train_bpe(texts, 2048, out / "tokenizer", min_frequency=1))
    tokenizer.chat_template = QA_CHAT_TEMPLATE  # QA as plain text, for SFT and evaluation alike
    eos = tokenizer.eos_token_id
    qa_convs = [it["messages"] + [{"role": "assistant", "content": it["answer"]}] for it in train_items]
    qa_examples = conversations_to_examples(qa_convs, tokenizer)
    qa_len = max(len(ids) for ids, _ in qa_examples)
    rows = []
    for name in conditions or list(CONDITIONS):
        augment, mixed, do_sft = CONDITIONS[name]
        t0 = time.perf_counter()
        copies = 5 if augment else 1
        bios = list(world.biographies(augment))
        owners = [i // copies for i in range(len(bios))]
        docs = [tokenizer.encode(b) for b in bios] + ([ids[1:-1] for ids, _ in qa_examples] if mixed else [])
        tokens = pretraining_tokens(docs, eos, pretrain_steps * micro_batch * seq_len, seed)
        cfg_model = ModelConfig(vocab_size=tokenizer.vocab_size, dim=dim, n_layers=layers, n_heads=max(1, dim // 32),
                                hidden_dim=int(dim * 8 / 3) // 8 * 8, max_seq_len=seq_len, eos_token_id=eos)
        model = Transformer(cfg_model).init_weights(seed=seed)
        tag = name.split()[0]
        for stage in ("pretrain", "sft"):  # a fresh run each time; metrics.jsonl and loss.png are kept as results
            shutil.rmtree(out / f"{stage}_{tag}", ignore_errors=True)
        common = dict(seq_len=seq_len, micro_batch=micro_batch, eval_every=0, save_every=0, progress=False,
                      threads=threads, peak_flops=1e12, seed=seed, keep_last=1, dtype=dtype)
        pre_cfg = TrainConfig(out_dir=str(out / f"pretrain_{tag}"), max_steps=pretrain_steps, lr=lr, min_lr=lr / 10,
                              warmup_steps=min(100, pretrain_steps // 10 + 1), weight_decay=0.1, **common)
        cached = Path(cache) / f"{tag}_{people}p_{pretrain_steps}s_{layers}x{dim}_lr{lr}_seed{seed}.pt" if cache else None
        if cached is not None and cached.is_file():  # rerun the SFT and measurements on the same pretrained model
            model.load_state_dict(torch.load(cached))
        else:
            batches = TokenBatches(tokens, seq_len, micro_batch, 1)
            model = train(model, Objective(loss_fn=lm_loss, batches=batches), pre_cfg).model
            if cached is not None:
                cached.parent.mkdir(parents=True, exist_ok=True)
                torch.save(model.state_dict(), cached)
        # storage is measured on each person's first biography, exactly as pretraining saw it
        first = [i for i in range(len(bios)) if i % copies == 0]
        stored = storage_accuracy(model, tokenizer, world, [bios[i] for i in first], [owners[i] for i in first])
        row = {"condition": name, "storage_train_people": stored["train"], "storage_heldout_people": stored["test"]}
        if do_sft:
            # One question per row, not packed: packed rows put a person's six QA pairs side by side, and the
            # model then answers from the previous answers in the row (the chain the plain biography stored)
            # instead of from the name. Same tokens per step as pretraining: rows are short, so more of them.
            sft_cfg = TrainConfig(**(common | dict(seq_len=qa_len, micro_batch=micro_batch * seq_len // qa_len)),
                                  out_dir=str(out / f"sft_{tag}"), max_steps=sft_steps, lr=lr / 4, min_lr=lr / 40,
                                  warmup_steps=min(20, sft_steps // 10 + 1), weight_decay=0.0)
            model = train(model, sft_objective(qa_examples, tokenizer, sft_cfg, pack=False), sft_cfg).model
            row["storage_heldout_after_sft"] = storage_accuracy(
                model, tokenizer, world, [bios[i] for i in first], [owners[i] for i in first])["test"]
        row["qa_exact_match_train_people"], _ = qa_accuracy(model, tokenizer, train_items)
        row["qa_exact_match_heldout_people"], per_attr = qa_accuracy(model, tokenizer, test_items)
        row.update({f"qa_heldout/{a}": v for a, v in per_attr.items()})
        row.update({f"storage_heldout/{a}": stored[f"test/{a}"] for a in ATTRIBUTES})
        row.update(people=people, documents=len(docs), pretrain_tokens=pretrain_steps * micro_batch * seq_len,
                   sft_steps=sft_steps if do_sft else 0, seconds=round(time.perf_counter() - t0, 1))
        rows.append(row)
        print({k: v for k, v in row.items() if "/" not in k}, flush=True)
        for stage in ("pretrain", "sft"):  # the loop's final checkpoint (weights + AdamW state) is not a result
            shutil.rmtree(out / f"{stage}_{tag}" / "checkpoints", ignore_errors=True)
    note = (f"bios world, {people} people (half held out of QA), {layers}x{dim} transformer, {pretrain_steps} "
            f"pretraining steps of {micro_batch}x{seq_len} tokens (lr {lr}), {sft_steps} QA SFT steps; storage = "
            "fraction of attribute values completed exactly inside the person's own biography after pretraining; "
            "QA = exact match of greedy answers; CPU, one thread")
    short = ["condition", "storage_train_people", "storage_heldout_people", "storage_heldout_after_sft",
             "qa_exact_match_train_people", "qa_exact_match_heldout_people", "pretrain_tokens", "sft_steps", "seconds"]
    write_results(out, "knowledge_extraction", [{k: r[k] for k in short if k in r} for r in rows], note)
    write_results(out, "knowledge_extraction_per_attribute", rows, note)
    bar_plot(out / "knowledge_extraction.png", [r["condition"].split(" (")[0] for r in rows],
             {"storage, held-out people": [r["storage_heldout_people"] for r in rows],
              "QA, train people": [r["qa_exact_match_train_people"] for r in rows],
              "QA, held-out people": [r["qa_exact_match_heldout_people"] for r in rows]},
             "Knowledge storage vs extraction", "exact match")
    return rows


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--people", type=int, default=200)
    p.add_argument("--pretrain-steps", type=int, default=600)
    p.add_argument("--sft-steps", type=int, default=200)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--conditions", nargs="*", choices=list(CONDITIONS))
    p.add_argument("--out", default="experiments/results/knowledge")
    p.add_argument("--cache", help="keep pretrained weights here (not in --out) and reuse them on a rerun")
    a = p.parse_args()
    run(a.people, a.pretrain_steps, a.sft_steps, a.dim, a.layers, out=a.out, threads=a.threads,
        conditions=a.conditions, lr=a.lr, dtype=a.dtype, cache=a.cache)
