"""A small transformer trained on the bios world in under a minute: the subject of the tests and experiments.

Biographies are written with every augmentation of Physics of LMs 3.1 (several wordings, shuffled sentences,
full names), so each fact is stored under the person's name, and trained with llmlab's one training loop.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from llmlab.data.bios import FEMALE_NAMES, LAST_NAMES, MALE_NAMES, World, make_bios_world
from llmlab.model import ModelConfig, Transformer
from llmlab.tokenizer import Tokenizer
from llmlab.tokenizer.train import train_bpe
from llmlab.train.config import TrainConfig
from llmlab.train.loop import Objective, train
from llmlab.train.pretrain import TokenBatches, lm_loss

AUGMENT = "multi,permute,fullname"


@dataclass
class BiosModel:
    model: Transformer
    tokenizer: Tokenizer
    world: World


def bios_tokens(docs: list[list[int]], eos: int, n_tokens: int, seed: int) -> np.ndarray:
    """Documents, each after an end-of-text, reshuffled every epoch until n_tokens are covered."""
    rng, out = random.Random(seed), []
    while len(out) < n_tokens + 1:
        order = list(range(len(docs)))
        rng.shuffle(order)
        for i in order:
            out += [eos] + docs[i]
    return np.array(out, dtype=np.int32)


def pooled_names(world: World, pool: int, seed: int = 0) -> World:
    """The same people renamed "First Last" from `pool` first names per gender and `pool` last names, each name
    shared by several people: no one token of a name tells who it is, so the model has to combine them."""
    rng = random.Random(f"{seed}/pooled")
    lasts = LAST_NAMES[:pool]
    names = {g: rng.sample([f"{f} {l}" for f, l in itertools.product(first[:pool], lasts)], pool * pool)
             for g, first in (("he", MALE_NAMES), ("she", FEMALE_NAMES))}
    if any(sum(p.pronoun == g for p in world.people) > pool * pool for g in names):
        raise ValueError(f"{len(world.people)} people do not fit {pool} x {pool} names per gender")
    return World([replace(p, name=names[p.pronoun].pop()) for p in world.people], world.seed)


def train_bios_model(out_dir: str | Path, people: int = 48, steps: int = 300, dim: int = 128, layers: int = 4,
                     seq_len: int = 64, micro_batch: int = 16, lr: float = 3e-3, vocab: int = 600,
                     seed: int = 0, name_pool: int = 0, augment: str = AUGMENT) -> BiosModel:
    """Pretrain a fresh model on the biographies of `people` people; out_dir gets the tokenizer and run files.
    name_pool > 0 renames them with pooled_names."""
    out_dir = Path(out_dir)
    world = make_bios_world(people, seed=seed)
    if name_pool:
        world = pooled_names(world, name_pool, seed)
    bios = list(world.biographies(augment))
    tokenizer = Tokenizer.from_dir(train_bpe(bios, vocab, out_dir / "tokenizer", min_frequency=1))
    eos = tokenizer.eos_token_id
    tokens = bios_tokens([tokenizer.encode(b) for b in bios], eos, steps * micro_batch * seq_len, seed)
    cfg = ModelConfig(vocab_size=tokenizer.vocab_size, dim=dim, n_layers=layers, n_heads=max(1, dim // 32),
                      hidden_dim=int(dim * 8 / 3) // 8 * 8, max_seq_len=seq_len, eos_token_id=eos)
    model = Transformer(cfg).init_weights(seed=seed)
    train_cfg = TrainConfig(out_dir=str(out_dir / "pretrain"), max_steps=steps, lr=lr, min_lr=lr / 10,
                            warmup_steps=min(30, steps // 10 + 1), weight_decay=0.0, seq_len=seq_len,
                            micro_batch=micro_batch, eval_every=0, save_every=0, progress=False, seed=seed,
                            keep_last=1, dtype="bfloat16", peak_flops=1e12, threads=1)
    model = train(model, Objective(loss_fn=lm_loss, batches=TokenBatches(tokens, seq_len, micro_batch, 1)),
                  train_cfg).model
    model.eval()
    return BiosModel(model.float(), tokenizer, world)


def fact_prompt(tokenizer, name: str, relation: str = " was born in") -> tuple[list[int], range]:
    """Token ids of "<eos>{name}{relation}" (as a biography starts) and the positions of the name's tokens."""
    eos = tokenizer.eos_token_id
    name_ids = tokenizer.encode(name)
    ids = [eos] + name_ids + tokenizer.encode(relation)
    if ids[:1 + len(name_ids)] != [eos] + tokenizer.encode(name + relation)[:len(name_ids)]:
        raise ValueError(f"the name {name!r} does not end on a token boundary before {relation!r}")
    return ids, range(1, 1 + len(name_ids))


def answer_id(tokenizer, value: str) -> int:
    """The first token of an attribute's value as it follows the prompt (after a space)."""
    return tokenizer.encode(" " + value)[0]
