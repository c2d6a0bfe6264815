"""The speedrun's stages up to a pretrained model: corpus, tokenizer, trial steps (which also pick the thread
count), pretraining."""

from __future__ import annotations

import json
import random
import statistics
import time
from pathlib import Path

from llmlab.errors import LLMLabError
from llmlab.io import atomic_write_bytes, atomic_write_text
from llmlab.speedrun.config import AUGMENT, BIOS_PER_PERSON, SpeedrunConfig


def build_corpus(run_dir: Path, cfg: SpeedrunConfig):
    """The world, its augmented biographies (shuffled, so one person's copies are spread out), cleaned."""
    from llmlab.data.bios import make_bios_world
    from llmlab.data.clean import CleanConfig, clean_corpus
    from llmlab.data.filters import FilterConfig
    from llmlab.data.ingest import JsonlWriter

    world = make_bios_world(cfg.people, cfg.seed)
    corpus = run_dir / "corpus"
    world.write(corpus / "world", augment=AUGMENT, multi=BIOS_PER_PERSON)
    bios = list(world.biographies(AUGMENT, BIOS_PER_PERSON))
    random.Random(cfg.seed).shuffle(bios)
    with JsonlWriter(corpus / "raw.jsonl") as w:
        for text in bios:
            w.write({"text": text})
    # The Gopher quality rules are tuned on web pages: a biography repeating a full name six times fails the
    # top-n-gram rule, and most are under 50 words. Synthetic text is clean by construction, so the rules are off;
    # normalization and exact + near dedup (which must keep differently worded copies of a person) stay on.
    filters = FilterConfig(min_words=5, top_ngram_max_char_fraction={}, dup_ngram_max_char_fraction={},
                           min_quality=0.0, blocklist="")
    report = clean_corpus(corpus / "raw.jsonl", corpus / "clean.jsonl", CleanConfig(filters=filters),
                          report_dir=corpus)
    return world, report


def read_texts(jsonl: Path) -> list[str]:
    with open(jsonl, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


def train_tokenizer(run_dir: Path, cfg: SpeedrunConfig, texts: list[str], questions: list[str],
                    heldout: list[str]) -> dict:
    """A BPE on the biographies and the SFT questions, with the plain-text QA chat template."""
    from llmlab.checkpoint.registry import cached_path
    from llmlab.data.bios import QA_CHAT_TEMPLATE
    from llmlab.checkpoint.gguf import tokenizer_from_gguf
    from llmlab.tokenizer.train import bytes_per_token, train_bpe

    out = train_bpe(texts + questions, cfg.vocab_size, run_dir / "tokenizer", model_max_length=cfg.seq_len)
    tok_cfg = json.loads((out / "tokenizer_config.json").read_text())
    atomic_write_text(out / "tokenizer_config.json",
                      json.dumps(tok_cfg | {"chat_template": QA_CHAT_TEMPLATE}, indent=2) + "\n")
    stats = {"vocab_size": cfg.vocab_size, "bytes_per_token": bytes_per_token(out, heldout),
             "smollm2_bytes_per_token": None}
    smol = cached_path("smollm2")
    if smol.is_file():  # only if already pulled: the speedrun never downloads anything
        smol_tok = tokenizer_from_gguf(smol)
        stats["smollm2_bytes_per_token"] = bytes_per_token(smol_tok, heldout)
        stats["smollm2_vocab_size"] = smol_tok.vocab_size
    return stats


# ----------------------------------------------------------------------------- pretraining


def shuffle_epochs(shard_dir: Path, cfg: SpeedrunConfig) -> dict:
    """Rewrite the train shard as enough passes over its documents for max_steps, each pass in a fresh random
    order; returns the tokens of one pass. Pretraining reads the shard in order, and with one fixed order every
    epoch has the same batches and a biography always follows the same one: the model then also learns that
    sequence, cueing a person's facts with the text before their name. experiments/knowledge_extraction.py
    reshuffles every epoch."""
    import numpy as np

    from llmlab.data.pack import MANIFEST, load_manifest, load_shards

    manifest = load_manifest(shard_dir)
    tokens = np.array(load_shards(shard_dir, "train"))
    docs = np.split(tokens, np.flatnonzero(tokens == manifest["eos_id"])[:-1] + 1)  # each ends with its EOS
    epochs = cfg.max_steps * cfg.micro_batch * cfg.seq_len // len(tokens) + 2
    rng = random.Random(f"epochs/{cfg.seed}")
    order = [i for _ in range(epochs) for i in rng.sample(range(len(docs)), len(docs))]
    shard = next(s for s in manifest["shards"] if s["split"] == "train")
    atomic_write_bytes(shard_dir / shard["file"], np.concatenate([docs[i] for i in order]).tobytes())
    shard["tokens"], shard["documents"] = epochs * len(tokens), epochs * len(docs)
    manifest["tokens"]["train"], manifest["documents"]["train"] = shard["tokens"], shard["documents"]
    atomic_write_text(shard_dir / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return {"train": len(tokens), "val": manifest["tokens"]["val"], "epochs_written": epochs}


def model_settings(run_dir: Path, cfg: SpeedrunConfig):
    from llmlab.data.pack import load_manifest
    from llmlab.train.pretrain import model_config

    manifest = load_manifest(run_dir / "shards")
    return model_config(None, manifest["vocab_size"], cfg.seq_len, manifest["eos_id"], dim=cfg.dim,
                        n_layers=cfg.n_layers, n_heads=cfg.n_heads, hidden_dim=cfg.hidden_dim)


def time_steps(run_dir: Path, cfg: SpeedrunConfig, thread_counts: list[int], rounds: int = 2) -> dict[int, float]:
    """Seconds per pretraining step at each thread count, measured on a throwaway copy of the model. The counts
    take turns, round after round, so a change in the machine's load hits all of them; the median round counts.
    Torch's threads wait for each other after every operation, so on cores shared with other work more threads
    can be slower (here 10x under a load of 12): only measuring now tells. A count 3x slower than the best in the
    first, warm-up round is not timed further (its warm-up time is returned)."""
    import torch

    from llmlab.data.pack import load_shards
    from llmlab.model import Transformer
    from llmlab.train.config import TrainConfig
    from llmlab.train.loop import Objective, train_step
    from llmlab.train.optim import make_optimizer
    from llmlab.train.pretrain import TokenBatches, lm_loss

    model = Transformer(model_settings(run_dir, cfg)).init_weights(seed=cfg.seed).train()
    optimizer = make_optimizer(model, cfg.lr, 0.1)
    batches = TokenBatches(load_shards(run_dir / "shards", "train"), cfg.seq_len, cfg.micro_batch, 1)
    objective, tcfg = Objective(lm_loss, batches), TrainConfig(seq_len=cfg.seq_len, micro_batch=cfg.micro_batch)
    seconds = {n: [] for n in thread_counts}
    timed = list(thread_counts)
    before = torch.get_num_threads()
    try:
        for round_ in range(rounds + 1):
            for n in timed:
                torch.set_num_threads(n)
                t = time.perf_counter()
                train_step(model, model, objective, optimizer, tcfg)
                seconds[n].append(time.perf_counter() - t)
            best = min(seconds[n][0] for n in timed)
            timed = [n for n in timed if seconds[n][0] <= 3 * best]
    finally:
        torch.set_num_threads(before)
    return {n: statistics.median(s[1:]) if len(s) > 1 else s[0] for n, s in seconds.items()}


def plan_steps(cfg: SpeedrunConfig, seconds_left: float, step_seconds: float) -> dict[str, int]:
    """Pretraining, SFT and DPO steps that fit in what is left of the budget, all cut by the same factor when the
    planned ones do not (the recipe keeps its proportions on a slow machine). Every kind of step is counted as a
    pretraining step (an SFT step sees as many tokens; DPO's are cheaper); ~10% goes to evaluations and
    checkpoints during training; the evaluation stages (generation, DPO's scoring and sampling) are reserved ~2
    steps' time per evaluated person, as measured on a loaded 2-core machine."""
    reserve = 10 + 2 * cfg.eval_people * step_seconds
    planned = cfg.max_steps + cfg.sft_steps + cfg.dpo_steps
    scale = min(1.0, 0.9 * (seconds_left - reserve) / (planned * step_seconds))
    return {"max_steps": max(10, int(cfg.max_steps * scale)), "sft_steps": max(5, int(cfg.sft_steps * scale)),
            "dpo_steps": max(2, int(cfg.dpo_steps * scale))}


def pretrain_model(run_dir: Path, cfg: SpeedrunConfig):
    from llmlab.train.config import TrainConfig
    from llmlab.train.pretrain import pretrain

    tcfg = TrainConfig(out_dir=str(run_dir / "pretrain"), seed=cfg.seed, seq_len=cfg.seq_len,
                       micro_batch=cfg.micro_batch, max_steps=cfg.max_steps, lr=cfg.lr, min_lr=cfg.min_lr,
                       warmup_steps=cfg.warmup_steps, eval_every=cfg.eval_every, eval_batches=4,
                       sample_tokens=32, num_samples=2, log_every=1, save_every=0, keep_last=1,
                       progress=cfg.progress, threads=cfg.threads, dtype="bfloat16")
    mcfg = model_settings(run_dir, cfg)
    result, final = pretrain(run_dir / "shards", tcfg, mcfg, tokenizer_dir=run_dir / "tokenizer")
    if result.interrupted or final is None:
        raise LLMLabError(f"pretraining was interrupted; its checkpoint is in {run_dir / 'pretrain'}")
    return result, tcfg, mcfg


def pretrain_summary(run_dir: Path, result, tcfg, mcfg, epoch_tokens: int) -> dict:
    from llmlab.train.loop import read_metrics

    records = read_metrics(run_dir / "pretrain" / "metrics.jsonl")
    train_rows = [r for r in records if "loss" in r]
    val_rows = [r for r in records if "val_loss" in r]
    tps = sorted(r["tok_per_s"] for r in train_rows)
    mfus = sorted(r["mfu"] for r in train_rows)
    tokens = result.step * tcfg.tokens_per_step
    return {"params": mcfg.n_params(), "steps": result.step, "tokens_per_step": tcfg.tokens_per_step,
            "tokens": tokens, "epochs": tokens / epoch_tokens,
            "first_loss": train_rows[0]["loss"], "final_loss": train_rows[-1]["loss"],
            "val_loss": val_rows[-1]["val_loss"], "val_bpb": val_rows[-1].get("val_bpb"),
            "tokens_per_s": tps[len(tps) // 2], "mfu": mfus[len(mfus) // 2],
            "samples": val_rows[-1].get("samples", [])}
