"""Knowledge storage and extraction (Physics of Language Models, Part 3.1) on the bios world.

Pretrain a small transformer from scratch on biographies of every person, finetune it (SFT) on QA for the
training half of the people, and measure exact-match QA accuracy on the held-out half, once with plain
biographies (one per person) and once with knowledge augmentation (several rewordings per person, shuffled
sentences, full names). The paper's finding: without augmentation extraction for held-out people is poor,
with augmentation it is high. Both conditions get the same number of pretraining and SFT steps.

    python experiments/knowledge_extraction.py [--people 100] [--pretrain-steps 1500] [--sft-steps 300] [--out DIR]
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import bar_plot, write_results  # noqa: E402

from llmlab.data.bios import make_bios_world  # noqa: E402
from llmlab.model import ModelConfig, Transformer  # noqa: E402
from llmlab.tokenizer import Tokenizer  # noqa: E402
from llmlab.tokenizer.train import train_bpe  # noqa: E402
from llmlab.train.chat_data import conversations_to_examples  # noqa: E402
from llmlab.train.config import TrainConfig  # noqa: E402
from llmlab.train.loop import Objective, train  # noqa: E402
from llmlab.train.pretrain import TokenBatches, lm_loss  # noqa: E402
from llmlab.train.sft import answer, exact_match, sft_objective  # noqa: E402
from llmlab.train.tasks import bios_qa_items  # noqa: E402

CONDITIONS = {"no augmentation": None, "augmented (multi5+permute+fullname)": "multi,permute,fullname"}


def run(people: int = 100, pretrain_steps: int = 1500, sft_steps: int = 300, dim: int = 256, layers: int = 4,
        seq_len: int = 128, micro_batch: int = 16, out: str | Path = "experiments/results/knowledge",
        threads: int = 1, seed: int = 0) -> list[dict]:
    out = Path(out)
    torch.set_num_threads(threads)
    world = make_bios_world(people, seed=seed)
    train_items, test_items = bios_qa_items(world, "train"), bios_qa_items(world, "test")
    texts = list(world.biographies("multi,permute,fullname")) + [f"{it['messages'][0]['content']} {it['answer']}"
                                                                  for it in train_items + test_items]
    tokenizer = Tokenizer.from_dir(train_bpe(texts, 2048, out / "tokenizer", min_frequency=1))
    eos = tokenizer.eos_token_id
    sft_convs = [it["messages"] + [{"role": "assistant", "content": it["answer"]}] for it in train_items]
    rows = []
    for name, augment in CONDITIONS.items():
        t0 = time.perf_counter()
        bios = list(world.biographies(augment))
        random.Random(seed).shuffle(bios)
        tokens = np.array([t for bio in bios for t in tokenizer.encode(bio) + [eos]], dtype=np.int32)
        while len(tokens) < micro_batch * seq_len + 1:  # tiny worlds: repeat until one batch fits
            tokens = np.concatenate([tokens, tokens])
        cfg_model = ModelConfig(vocab_size=tokenizer.vocab_size, dim=dim, n_layers=layers, n_heads=max(1, dim // 64),
                                hidden_dim=int(dim * 8 / 3) // 8 * 8, max_seq_len=seq_len, eos_token_id=eos)
        model = Transformer(cfg_model).init_weights(seed=seed)
        tag = "aug" if augment else "plain"
        common = dict(seq_len=seq_len, micro_batch=micro_batch, eval_every=0, save_every=0, progress=False,
                      threads=threads, peak_flops=1e12, seed=seed, keep_last=1)
        pre_cfg = TrainConfig(out_dir=str(out / f"pretrain_{tag}"), max_steps=pretrain_steps, lr=1e-3, min_lr=1e-4,
                              warmup_steps=min(100, pretrain_steps // 10 + 1), weight_decay=0.1, **common)
        batches = TokenBatches(tokens, seq_len, micro_batch, 1)
        model = train(model, Objective(loss_fn=lm_loss, batches=batches), pre_cfg, resume=True).model
        sft_cfg = TrainConfig(out_dir=str(out / f"sft_{tag}"), max_steps=sft_steps, lr=3e-4, min_lr=3e-5,
                              warmup_steps=min(20, sft_steps // 10 + 1), weight_decay=0.0, **common)
        examples = conversations_to_examples(sft_convs, tokenizer)
        model = train(model, sft_objective(examples, tokenizer, sft_cfg), sft_cfg, resume=True).model
        row = {"condition": name}
        for split, items in (("train_people", train_items), ("heldout_people", test_items)):
            replies = answer(model, tokenizer, [it["messages"] for it in items], max_new_tokens=16)
            row[f"qa_exact_match_{split}"] = exact_match(replies, [it["answer"] for it in items])
        row.update(people=people, biographies=len(bios), pretrain_tokens=pretrain_steps * micro_batch * seq_len,
                   seconds=round(time.perf_counter() - t0, 1))
        rows.append(row)
        print(row, flush=True)
    note = (f"bios world, {people} people (half held out of SFT), {layers}x{dim} transformer, "
            f"{pretrain_steps} pretraining + {sft_steps} SFT steps of {micro_batch}x{seq_len} tokens; CPU, shared machine")
    write_results(out, "knowledge_extraction", rows, note)
    bar_plot(out / "knowledge_extraction.png", [r["condition"].split(" (")[0] for r in rows],
             {"train people (SFT'd)": [r["qa_exact_match_train_people"] for r in rows],
              "held-out people": [r["qa_exact_match_heldout_people"] for r in rows]},
             "QA exact match after SFT", "accuracy")
    return rows


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--people", type=int, default=100)
    p.add_argument("--pretrain-steps", type=int, default=1500)
    p.add_argument("--sft-steps", type=int, default=300)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="experiments/results/knowledge")
    a = p.parse_args()
    run(a.people, a.pretrain_steps, a.sft_steps, a.dim, a.layers, out=a.out, threads=a.threads)
