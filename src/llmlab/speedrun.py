"""The speedrun: corpus -> tokenizer -> shards -> pretraining -> evaluation -> SFT -> DPO -> report, in one timed
run directory.

On the built-in bios world (fictional people with six facts each, knowledge-augmented biographies) so that a
model small enough for a laptop CPU can learn something checkable: whether it stored each person's facts, and
whether finetuning teaches it to answer questions about them (Physics of Language Models 3.1: SFT on the QA of
half of the people, exact match on the other, held-out half).

RUN_DIR layout when it finishes:
    corpus/      world/ (people, QA), raw.jsonl, clean.jsonl, report.{md,json} of the cleaning pipeline
    tokenizer/   the trained byte-level BPE (tokenizer.json, tokenizer_config.json with the ChatML template)
    shards/      packed train/val tokens and their manifest
    pretrain/    metrics.jsonl, loss.png, checkpoints/ (resumable with `llmlab pretrain --resume`), model/
    sft/         SFT on the QA conversations of the training people: metrics.jsonl, checkpoints/, model/
    dpo/         DPO on (correct, subtly wrong) answers of the same people: metrics.jsonl, checkpoints/, model/
    model/       the final model (a copy of dpo/model), a Hugging Face directory: `llmlab chat --model RUN_DIR`
    stages.png, summary.json, report.md   written last; report.md exists only when the whole run finished
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import random
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from llmlab.errors import LLMLabError
from llmlab.io import atomic_write_bytes, atomic_write_text

AUGMENT = "multi,permute,fullname"
BIOS_PER_PERSON = 5  # of the 6 wordings per attribute; the 6th is held out to test knowledge, not wording

# Completion probes: the sentence start of one of the world's own templates, answered by the attribute's value.
PROBES = {
    "birth_date": "{name} was born on",
    "birth_city": "{name} was born in",
    "university": "{name} graduated from",
    "major": "{name} majored in",
    "employer": "{name} worked for",
    "employer_city": "{name} worked in",
}


@dataclass
class SpeedrunConfig:
    people: int = 500
    seed: int = 0
    vocab_size: int = 4096
    # model (Llama-style; the vocabulary comes from the tokenizer)
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 4
    hidden_dim: int = 688
    # training
    seq_len: int = 256
    micro_batch: int = 16
    max_steps: int = 800
    # wall-clock budget of the whole run in seconds (0: none): pretraining takes fewer than max_steps steps when
    # a timed trial step says max_steps would not fit (a busy machine), so the run still ends on time
    time_budget: float = 900
    lr: float = 2e-3
    min_lr: float = 2e-4
    warmup_steps: int = 50
    eval_every: int = 100
    threads: int = 0  # 0: auto, the cores not already busy (see auto_threads)
    # evaluation
    eval_people: int = 100  # people probed for facts / whose held-out biographies are scored / asked questions
    # post-training on bios QA: SFT on the training people's questions, then DPO on correct vs. wrong answers
    sft_steps: int = 100  # ~8 epochs of the training people's questions
    sft_lr: float = 2e-3
    dpo_steps: int = 60
    dpo_lr: float = 3e-5
    dpo_beta: float = 0.1
    progress: bool = True

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Budgets measured on a 2-core x86 CPU (see report.md "Time per stage" of a run for the actual numbers).
PRESETS = {
    # every stage, as small as still means something: the test suite runs it (well under a minute)
    # (one thread: a model this small gains nothing from two, and tests run side by side)
    "ci": dict(people=40, vocab_size=512, dim=64, n_layers=2, n_heads=4, hidden_dim=172, seq_len=128,
               micro_batch=8, max_steps=60, lr=3e-3, min_lr=3e-4, warmup_steps=10, eval_every=30, eval_people=20,
               sft_steps=40, sft_lr=3e-3, dpo_steps=20, time_budget=0, threads=1),
    # about 3 minutes: learns the format and some facts
    "tiny": dict(people=200, vocab_size=2048, dim=128, n_layers=4, n_heads=4, hidden_dim=344, seq_len=256,
                 micro_batch=16, max_steps=250, lr=3e-3, min_lr=3e-4, warmup_steps=25, eval_every=50,
                 eval_people=60, sft_steps=80, sft_lr=3e-3, dpo_steps=40, time_budget=210),
    # at most 15 minutes: a 4M-parameter model that stores a good part of the facts
    "default": dict(),  # 800 steps: see SpeedrunConfig
}


def preset_config(preset: str = "default", **overrides) -> SpeedrunConfig:
    if preset not in PRESETS:
        raise LLMLabError(f"unknown speedrun preset {preset!r} (choose from {', '.join(PRESETS)})")
    fields_ = {**PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None}}
    unknown = set(fields_) - {f.name for f in dataclasses.fields(SpeedrunConfig)}
    if unknown:
        raise LLMLabError(f"unknown speedrun setting {sorted(unknown)[0]!r}")
    return SpeedrunConfig(**fields_)


class Stages:
    """Wall-clock time and a throughput figure per stage, printed as each one ends."""

    def __init__(self, log):
        self.records: dict[str, dict] = {}
        self.log = log

    def run(self, name: str, fn, *args, **kwargs):
        self.log(f"[{len(self.records) + 1}] {name} ...")
        t = time.perf_counter()
        out = fn(*args, **kwargs)
        self.records[name] = {"seconds": time.perf_counter() - t}
        return out

    def note(self, name: str, amount: float, unit: str):
        r = self.records[name]
        r["throughput"], r["unit"] = amount / max(r["seconds"], 1e-9), unit
        self.log(f"    {name}: {r['seconds']:.1f} s, {r['throughput']:,.0f} {unit}")


# ----------------------------------------------------------------------------- stages


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


def heldout_biographies(world, people_idx: list[int]) -> list[str]:
    """The 6th wording of each chosen person: known facts in sentences the model never saw."""
    copies = BIOS_PER_PERSON + 1
    all_bios = list(world.biographies(AUGMENT, copies))
    return [all_bios[i * copies + BIOS_PER_PERSON] for i in people_idx]


def unseen_biographies(cfg: SpeedrunConfig, n: int) -> list[str]:
    """Biographies of people who are not in the corpus: their facts cannot be known, only guessed."""
    from llmlab.data.bios import make_bios_world

    other = make_bios_world(n + cfg.people, cfg.seed + 1)
    ours = {p.name for p in make_bios_world(cfg.people, cfg.seed).people}
    keep = [i for i, p in enumerate(other.people) if p.name not in ours]
    bios = list(other.biographies(AUGMENT, 1))
    return [bios[i] for i in keep[:n]]


def train_tokenizer(run_dir: Path, cfg: SpeedrunConfig, texts: list[str], heldout: list[str]) -> dict:
    from llmlab.checkpoint.registry import cached_path
    from llmlab.tokenizer.train import bytes_per_token, train_bpe

    out = train_bpe(texts, cfg.vocab_size, run_dir / "tokenizer", model_max_length=cfg.seq_len)
    stats = {"vocab_size": cfg.vocab_size, "bytes_per_token": bytes_per_token(out, heldout),
             "smollm2_bytes_per_token": None}
    smol = cached_path("smollm2")
    if smol.is_file():  # only if already pulled: the speedrun never downloads anything
        from llmlab.tokenizer import Tokenizer
        smol_tok = Tokenizer.from_gguf(smol)
        stats["smollm2_bytes_per_token"] = bytes_per_token(smol_tok, heldout)
        stats["smollm2_vocab_size"] = smol_tok.vocab_size
    return stats


def seconds_per_step(run_dir: Path, cfg: SpeedrunConfig, trials: int = 3) -> float:
    """Time a few real training steps of a throwaway copy of the model (after one warm-up step)."""
    from llmlab.data.pack import load_manifest, load_shards
    from llmlab.model import Transformer
    from llmlab.train.config import TrainConfig
    from llmlab.train.loop import Objective, train_step
    from llmlab.train.optim import make_optimizer
    from llmlab.train.pretrain import TokenBatches, lm_loss, model_config

    manifest = load_manifest(run_dir / "shards")
    mcfg = model_config(None, manifest["vocab_size"], cfg.seq_len, manifest["eos_id"], dim=cfg.dim,
                        n_layers=cfg.n_layers, n_heads=cfg.n_heads, hidden_dim=cfg.hidden_dim)
    model = Transformer(mcfg).init_weights(seed=cfg.seed).train()
    optimizer = make_optimizer(model, cfg.lr, 0.1)
    batches = TokenBatches(load_shards(run_dir / "shards", "train"), cfg.seq_len, cfg.micro_batch, 1)
    objective, tcfg = Objective(lm_loss, batches), TrainConfig(seq_len=cfg.seq_len, micro_batch=cfg.micro_batch)
    train_step(model, model, objective, optimizer, tcfg)
    t = time.perf_counter()
    for _ in range(trials):
        train_step(model, model, objective, optimizer, tcfg)
    return (time.perf_counter() - t) / trials


def steps_within_budget(cfg: SpeedrunConfig, seconds_left: float, step_seconds: float) -> int:
    """How many steps fit in what is left of the budget: ~10% goes to evaluations and checkpoints during
    training, a fixed reserve to the evaluation stages and the report, and to SFT and DPO as many pretraining
    steps as they take steps (a pessimistic bound: their rows are shorter or only partly carry loss)."""
    reserve = 10 + 0.05 * cfg.time_budget + (cfg.sft_steps + cfg.dpo_steps) * step_seconds
    return max(10, min(cfg.max_steps, int(0.9 * (seconds_left - reserve) / step_seconds)))


def pretrain_model(run_dir: Path, cfg: SpeedrunConfig):
    from llmlab.train.config import TrainConfig
    from llmlab.train.pretrain import model_config, pretrain
    from llmlab.data.pack import load_manifest

    manifest = load_manifest(run_dir / "shards")
    tcfg = TrainConfig(out_dir=str(run_dir / "pretrain"), seed=cfg.seed, seq_len=cfg.seq_len,
                       micro_batch=cfg.micro_batch, max_steps=cfg.max_steps, lr=cfg.lr, min_lr=cfg.min_lr,
                       warmup_steps=cfg.warmup_steps, eval_every=cfg.eval_every, eval_batches=4,
                       sample_tokens=32, num_samples=2, log_every=1, save_every=0, keep_last=1,
                       progress=cfg.progress, threads=cfg.threads, dtype="bfloat16")
    mcfg = model_config(None, manifest["vocab_size"], cfg.seq_len, manifest["eos_id"], dim=cfg.dim,
                        n_layers=cfg.n_layers, n_heads=cfg.n_heads, hidden_dim=cfg.hidden_dim)
    result, final = pretrain(run_dir / "shards", tcfg, mcfg, tokenizer_dir=run_dir / "tokenizer")
    if result.interrupted or final is None:
        raise LLMLabError(f"pretraining was interrupted; its checkpoint is in {run_dir / 'pretrain'}")
    return result, tcfg, mcfg


def probe_facts(llm, world, people_idx: list[int]) -> dict:
    """Greedy completion of "<name> was born in" style probes; exact match of the text up to the first period."""
    from llmlab.engine import SamplingParams

    tok = llm.tokenizer
    eos = tok.eos_token_id
    prompts, answers, attrs = [], [], []
    for i in people_idx:
        p = world.people[i]
        for attr, probe in PROBES.items():
            # a document starts right after an EOS in the packed stream, so the probe does too
            prompts.append([eos] + tok.encode(probe.format(name=p.name)))
            answers.append(getattr(p, attr))
            attrs.append(attr)
    params = SamplingParams(temperature=0.0, max_new_tokens=16, stop=["."])
    done = llm.engine.generate(prompts, params)
    per_attr = {a: [0, 0] for a in PROBES}
    examples = []
    for c, answer, attr, i in zip(done, answers, attrs, [i for i in people_idx for _ in PROBES]):
        got = c.text.strip()
        per_attr[attr][0] += got == answer
        per_attr[attr][1] += 1
        if len(examples) < 12:
            examples.append({"prompt": PROBES[attr].format(name=world.people[i].name), "expected": answer,
                             "got": got, "correct": got == answer})
    # the baseline: always answering the attribute's most common value (what a model knowing no one would do)
    baseline = {}
    for attr in PROBES:
        values = [getattr(world.people[i], attr) for i in people_idx]
        baseline[attr] = Counter(values).most_common(1)[0][1] / len(values)
    accuracy = {a: n / total for a, (n, total) in per_attr.items()}
    return {"accuracy": accuracy, "mean_accuracy": sum(accuracy.values()) / len(accuracy), "baseline": baseline,
            "mean_baseline": sum(baseline.values()) / len(baseline), "probes": len(prompts), "examples": examples}


def bits_per_byte(llm, texts: list[str]) -> dict:
    """Bits per UTF-8 byte and perplexity per token of whole documents, each scored after an EOS."""
    import torch
    import torch.nn.functional as F

    model, tok = llm.model, llm.tokenizer
    nll = n_tokens = n_bytes = 0.0
    with torch.no_grad():
        for text in texts:
            ids = [tok.eos_token_id] + tok.encode(text)
            ids = ids[:model.config.max_seq_len + 1]
            x = torch.tensor([ids])
            logits = model(x[:, :-1])
            nll += F.cross_entropy(logits[0].float(), x[0, 1:], reduction="sum").item()
            n_tokens += len(ids) - 1
            n_bytes += len(tok.decode(ids[1:]).encode("utf-8"))
    return {"bits_per_byte": nll / math.log(2) / n_bytes, "perplexity": math.exp(nll / n_tokens),
            "documents": len(texts), "tokens": int(n_tokens)}


def sample_texts(llm, world, people_idx: list[int], seed: int) -> list[dict]:
    tok = llm.tokenizer
    from llmlab.engine import SamplingParams

    prompts = [world.people[i].name for i in people_idx[:3]]
    done = llm.engine.generate([[tok.eos_token_id] + tok.encode(p) for p in prompts],
                               SamplingParams(temperature=0.7, max_new_tokens=48, seed=seed))
    return [{"prompt": p, "completion": c.text} for p, c in zip(prompts, done)]


def evaluate(model_dir: Path, cfg: SpeedrunConfig, world) -> dict:
    from llmlab.api import load

    llm = load(model_dir)
    llm.model.eval()
    rng = random.Random(cfg.seed)
    people_idx = sorted(rng.sample(range(len(world.people)), min(cfg.eval_people, len(world.people))))
    t = time.perf_counter()
    facts = probe_facts(llm, world, people_idx)
    facts["seconds"] = time.perf_counter() - t
    known = bits_per_byte(llm, heldout_biographies(world, people_idx))
    unseen = bits_per_byte(llm, unseen_biographies(cfg, len(people_idx)))
    return {"facts": facts, "heldout_known": known, "heldout_unseen": unseen,
            "samples": sample_texts(llm, world, people_idx, cfg.seed)}


# ----------------------------------------------------------------------------- post-training on bios QA

QA_TOKENS = 32  # the longest answer, a university name, is 22 tokens in the ci preset's 512-token vocabulary


def qa_items(world, split: str, n_people: int) -> list[dict]:
    """The QA items (6 questions each) of the first n_people people of a split ("train": SFT'd; "test": held out)."""
    from llmlab.train.tasks import bios_qa_items
    return bios_qa_items(world, split)[:6 * n_people]


def qa_preference_pairs(world, items: list[dict], seed: int) -> list[dict]:
    """{"messages", "chosen", "rejected"}: the correct answer against a plausible wrong one, another person's
    value of the same attribute (the right kind of answer, so only knowing the person tells them apart)."""
    rng = random.Random(f"pairs/{seed}")
    values = {a: sorted({getattr(p, a) for p in world.people}) for a in PROBES}
    pairs = []
    for it in items:
        others = [v for v in values[it["attribute"]] if v != it["answer"]]
        if others:
            pairs.append({"messages": it["messages"], "chosen": it["answer"], "rejected": rng.choice(others)})
    return pairs


def finetune_config(out_dir: Path, cfg: SpeedrunConfig, steps: int, lr: float, dtype: str):
    from llmlab.train.config import TrainConfig
    return TrainConfig(out_dir=str(out_dir), seed=cfg.seed, seq_len=cfg.seq_len, micro_batch=cfg.micro_batch,
                       max_steps=steps, lr=lr, min_lr=lr / 10, warmup_steps=max(1, steps // 10), weight_decay=0.0,
                       eval_every=0, log_every=1, save_every=0, keep_last=1, progress=cfg.progress,
                       threads=cfg.threads, dtype=dtype)


def sft_model(run_dir: Path, cfg: SpeedrunConfig, world, heldout: list[dict]) -> dict:
    """SFT the pretrained model on every question about the training people (answers only carry loss);
    exact match on the held-out people before and after, and the loss curve's ends."""
    from llmlab.train import tasks
    from llmlab.train.loop import read_metrics
    from llmlab.train.sft import sft_stage

    train_items = tasks.bios_qa_items(world, "train")
    conversations = [r["messages"] for r in tasks.sft_conversations(train_items)]
    tcfg = finetune_config(run_dir / "sft", cfg, cfg.sft_steps, cfg.sft_lr, "bfloat16")
    out = sft_stage(run_dir / "pretrain" / "model", conversations, heldout, tcfg, check=tasks.check,
                    max_new_tokens=QA_TOKENS)
    losses = [r["loss"] for r in read_metrics(run_dir / "sft" / "metrics.jsonl") if "loss" in r]
    out.update(conversations=len(conversations), tokens=out["steps"] * tcfg.tokens_per_step,
               first_loss=losses[0], final_loss=losses[-1])
    return out


def dpo_model(run_dir: Path, cfg: SpeedrunConfig, world, heldout: list[dict]) -> dict:
    """DPO from the SFT model (also the reference) on pairs for the training people; exact match on the held-out
    people before and after, the KL to the reference, and the implicit reward on training and held-out pairs."""
    from llmlab.train import tasks
    from llmlab.train.dpo import dpo_stage
    from llmlab.train.loop import read_metrics

    pairs = qa_preference_pairs(world, tasks.bios_qa_items(world, "train"), cfg.seed)
    # float32: the reference log-probabilities are, and at step 1 the policy's must equal them (margin 0)
    tcfg = finetune_config(run_dir / "dpo", cfg, cfg.dpo_steps, cfg.dpo_lr, "float32")
    out = dpo_stage(run_dir / "sft" / "model", pairs, heldout, tcfg, check=tasks.check, beta=cfg.dpo_beta,
                    max_new_tokens=QA_TOKENS)
    losses = [r["loss"] for r in read_metrics(run_dir / "dpo" / "metrics.jsonl") if "loss" in r]
    out.update(pairs=len(pairs), first_loss=losses[0], final_loss=losses[-1],
               train_pairs=implicit_rewards(run_dir / "dpo" / "model", run_dir / "sft" / "model", pairs,
                                            cfg.dpo_beta, cfg.seq_len),
               heldout_pairs=implicit_rewards(run_dir / "dpo" / "model", run_dir / "sft" / "model",
                                              qa_preference_pairs(world, heldout, cfg.seed), cfg.dpo_beta,
                                              cfg.seq_len))
    return out


def implicit_rewards(policy_dir: Path, reference_dir: Path, records: list[dict], beta: float, seq_len: int) -> dict:
    """DPO's implicit reward beta * (log pi - log pi_ref) of the chosen and the rejected answer, over a whole set
    of pairs: the share with the chosen answer above the rejected one, and the mean margin between them."""
    from llmlab.api import load_checkpoint
    from llmlab.train.chat_data import pair_rows, preference_pair
    from llmlab.train.dpo import reference_logps
    from llmlab.train.sft import pad_id_of

    policy, tokenizer, _ = load_checkpoint(policy_dir)
    reference = load_checkpoint(reference_dir)[0]
    rows = pair_rows([preference_pair(r, tokenizer) for r in records], seq_len)
    pad = pad_id_of(tokenizer)
    margins = [beta * ((pc - rc) - (pr - rr)) for (pc, pr), (rc, rr) in
               zip(reference_logps(policy.float(), rows, pad), reference_logps(reference.float(), rows, pad))]
    return {"accuracy": sum(m > 0 for m in margins) / len(margins), "margin": sum(margins) / len(margins),
            "pairs": len(margins)}


def qa_scores(model_dir: Path, world, items: list[dict]) -> dict:
    """Greedy answers to QA items: exact match, and the share of answers of the right kind (some person's value
    of the attribute asked about, right or wrong: the model learned how to answer, if not what)."""
    from llmlab.api import load_checkpoint
    from llmlab.train.sft import answer, exact_match
    from llmlab.train.tasks import normalise

    model, tokenizer, _ = load_checkpoint(model_dir)
    replies = answer(model.float(), tokenizer, [it["messages"] for it in items], QA_TOKENS)
    values = {a: {getattr(p, a) for p in world.people} for a in PROBES}
    kind = sum(normalise(r) in values[it["attribute"]] for r, it in zip(replies, items))
    return {"exact_match": exact_match(replies, [it["answer"] for it in items]),
            "right_kind": kind / max(1, len(items)), "questions": len(items),
            "examples": [{"question": it["messages"][0]["content"], "expected": it["answer"], "got": r.strip()}
                         for r, it in zip(replies[:4], items)]}


def stage_rows(run_dir: Path, world, trained: list[dict], sft: dict, dpo: dict) -> list[dict]:
    """The before/after table: each checkpoint's QA scores on SFT'd and held-out people, and DPO's figures."""
    rows = []
    for stage, heldout in (("pretrain", sft["before"]), ("sft", sft["after"]), ("dpo", dpo["after"])):
        scores = qa_scores(run_dir / stage / "model", world, trained)
        rows.append({"stage": stage, "path": f"{stage}/model", "qa_trained": scores["exact_match"],
                     "right_kind": scores["right_kind"], "qa_heldout": heldout, "examples": scores["examples"]})
    rows[2].update(kl=dpo["kl"], **{f"{k}_{m}": dpo[k][m] for k in ("train_pairs", "heldout_pairs")
                                    for m in ("accuracy", "margin")})
    return rows


def copy_model(src: Path, dst: Path):
    """dst becomes a copy of the checkpoint directory src, atomically."""
    from llmlab.io import new_temp_dir, replace_dir
    tmp = new_temp_dir(dst)
    shutil.copytree(src, tmp, dirs_exist_ok=True)
    replace_dir(tmp, dst)


# ----------------------------------------------------------------------------- report


def plot_stages(records: dict, png: Path):
    import io

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(records)
    secs = [records[n]["seconds"] for n in names]
    fig, ax = plt.subplots(figsize=(7, 0.5 * len(names) + 1.2), dpi=100)
    ax.barh(names[::-1], secs[::-1])
    for y, s in enumerate(secs[::-1]):
        ax.text(s, y, f" {s:.1f} s", va="center", fontsize=8)
    ax.set_xlabel("seconds")
    ax.set_title(f"speedrun stages: {sum(secs):.0f} s in all")
    ax.set_xlim(0, max(secs) * 1.25)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(png, buf.getvalue())


def render_report(s: dict) -> str:
    cfg, c, tk, pt, ev = s["config"], s["corpus"], s["tokenizer"], s["pretrain"], s["eval"]
    L = [f"# llmlab speedrun: {s['run_dir']}", "",
         f"Preset `{s['preset']}`, seed {cfg['seed']}, finished {s['finished']} on {s['machine']} "
         f"({s['threads']} torch threads; load average {s['load_average_start']} at the start, "
         f"{s['load_average']} at the end: above 0 the cores were shared with other work and every time below is "
         f"pessimistic). Total {s['total_seconds']:.0f} s.", "",
         "Talk to the model: `llmlab chat --model " + s["run_dir"] + "` (pretrained, then finetuned to answer "
         "questions such as \"What is the birth city of <full name>?\"; it knows nothing else).", "",
         "## Settings", "", "| setting | value |", "|---|---|"]
    L += [f"| {k} | {v} |" for k, v in cfg.items()]
    L += ["", "## Data", "",
          f"The bios world: {cfg['people']} fictional people with 6 facts each; {BIOS_PER_PERSON} differently "
          f"worded biographies per person, sentences shuffled, full names instead of pronouns ({AUGMENT}).", "",
          f"- documents in: {c['docs_in']} ({c['bytes_in']:,} bytes); kept: {c['docs_kept']} "
          f"({c['bytes_kept']:,} bytes)",
          "- removed: " + (", ".join(f"{k} {v['docs']}" for k, v in c["removed"].items()) or "none")
          + " (exact + near-duplicate detection on; the web-text quality rules are off for synthetic text)",
          f"- packed tokens: {pt['data_tokens']['train']:,} train, {pt['data_tokens']['val']:,} validation",
          "- full cleaning report: `corpus/report.md`", "",
          "## Tokenizer", "",
          f"Byte-level BPE trained on the corpus, {tk['vocab_size']} tokens. Bytes per token on held-out "
          "biographies (higher is better compression):", "",
          "| tokenizer | vocabulary | bytes/token |", "|---|---:|---:|",
          f"| this run's | {tk['vocab_size']} | {tk['bytes_per_token']:.2f} |"]
    if tk.get("smollm2_bytes_per_token"):
        L.append(f"| SmolLM2 (general purpose) | {tk['smollm2_vocab_size']} | {tk['smollm2_bytes_per_token']:.2f} |")
    else:
        L.append("| SmolLM2 | - | not in the cache (`llmlab pull smollm2` to compare) |")
    L += ["", "## Pretraining", "",
          f"A {pt['params'] / 1e6:.2f}M-parameter Llama ({cfg['n_layers']} layers, dim {cfg['dim']}, "
          f"{cfg['n_heads']} heads), {pt['steps']} steps of {pt['tokens_per_step']:,} tokens = "
          f"{pt['tokens']:,} tokens ({pt['epochs']:.1f} epochs), bf16 autocast over fp32 weights."
          + (f" The time budget ({cfg['time_budget']:.0f} s for the whole run) cut it from {pt['planned_steps']} "
             f"planned steps: a trial step took {pt['trial_seconds_per_step']:.2f} s on this machine now."
             if pt["steps"] < pt["planned_steps"] else ""), "",
          f"- train loss: {pt['first_loss']:.3f} at step 1 -> {pt['final_loss']:.3f} at the end",
          f"- validation loss {pt['val_loss']:.3f} nats/token, **{pt['val_bpb']:.3f} bits per byte**",
          f"- {pt['tokens_per_s']:,.0f} tokens/s (median step), MFU {pt['mfu']:.1%}", "",
          "![loss curve](pretrain/loss.png)", "",
          "## Evaluation", "",
          "### Knowledge: does the model complete facts about people it read about?", "",
          f"Greedy completions of {ev['facts']['probes']} probes such as \"<name> was born in\" for "
          f"{len(ev['facts']['accuracy'])} attributes of {cfg['eval_people']} people; "
          "exact match of the text up to the first period. The baseline always answers the attribute's most "
          "common value.", "",
          "| attribute | exact match | baseline |", "|---|---:|---:|"]
    f = ev["facts"]
    L += [f"| {a} | {f['accuracy'][a]:.1%} | {f['baseline'][a]:.1%} |" for a in f["accuracy"]]
    L += [f"| **mean** | **{f['mean_accuracy']:.1%}** | {f['mean_baseline']:.1%} |", "", "Examples:", ""]
    L += [f"- {'✓' if e['correct'] else '✗'} {e['prompt']} → `{e['got']}` (expected `{e['expected']}`)"
          for e in f["examples"]]
    k, u = ev["heldout_known"], ev["heldout_unseen"]
    L += ["", "### Held-out biographies", "",
          "| biographies | documents | bits/byte | perplexity/token |", "|---|---:|---:|---:|",
          f"| known people, a wording never trained on | {k['documents']} | {k['bits_per_byte']:.3f} | "
          f"{k['perplexity']:.2f} |",
          f"| people not in the corpus | {u['documents']} | {u['bits_per_byte']:.3f} | {u['perplexity']:.2f} |", "",
          "The gap between the two rows is what the model knows about the people it read about.", "",
          "## Samples", ""]
    L += ["Sampled at temperature 0.7 after a known person's name (in bold):", ""]
    L += [f"- **{x['prompt']}**{' '.join(x['completion'].split())}" for x in ev["samples"]]
    L += render_post_training(s["post_training"], cfg)
    L += ["", "## Time per stage", "", "| stage | seconds | throughput |", "|---|---:|---:|"]
    for name, r in s["stages"].items():
        thr = f"{r['throughput']:,.0f} {r['unit']}" if "throughput" in r else ""
        L.append(f"| {name} | {r['seconds']:.1f} | {thr} |")
    L += [f"| **total** | **{s['total_seconds']:.1f}** | |", "", "![stage times](stages.png)", ""]
    return "\n".join(L)


def render_post_training(post: dict, cfg: dict) -> list[str]:
    sft, dpo, rows = post["sft"], post["dpo"], post["rows"]
    L = ["", "## Post-training: SFT and DPO", "",
         f"- **SFT**: {sft['steps']} steps on the {sft['conversations']} questions about the training half of the "
         f"people, only the answer tokens carrying loss (lr {cfg['sft_lr']}); loss {sft['first_loss']:.3f} -> "
         f"{sft['final_loss']:.3f}.",
         f"- **DPO** from the SFT model (also its reference): {dpo['steps']} steps on {dpo['pairs']} pairs for the "
         f"same people, the correct answer against another person's value of the same attribute "
         f"(beta {cfg['dpo_beta']}, lr {cfg['dpo_lr']}); loss {dpo['first_loss']:.3f} -> {dpo['final_loss']:.3f}.",
         "",
         f"Greedy answers to {6 * post['qa_people']} questions about {post['qa_people']} people each side, exact "
         "match. *SFT'd people*: their questions were in the SFT data; *held-out people*: only their biographies "
         "were (knowledge extraction). *Right kind*: answers that are some person's value of the attribute asked "
         "about (SFT'd people). DPO's implicit reward beta * (log pi - log pi_ref) after training: the share of "
         "pairs it ranks right and its mean chosen-minus-rejected margin, on the training pairs and on the same kind "
         "of pairs for the held-out people; the KL to the SFT reference is per answer, sampled on held-out "
         "questions.", "",
         "| checkpoint | QA exact match, SFT'd people | right kind | QA exact match, held-out people | "
         "DPO reward accuracy (margin), training pairs | same, held-out pairs | KL to SFT |",
         "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        dpo_cols = (f"{r['train_pairs_accuracy']:.1%} ({r['train_pairs_margin']:+.3f}) | "
                    f"{r['heldout_pairs_accuracy']:.1%} ({r['heldout_pairs_margin']:+.3f}) | {r['kl']:.3f}"
                    if "kl" in r else "| |")
        L.append(f"| {r['stage']} (`{r['path']}`) | {r['qa_trained']:.1%} | {r['right_kind']:.1%} | "
                 f"{r['qa_heldout']:.1%} | {dpo_cols} |")
    L += ["", "Answers of the final model to questions about SFT'd people:", ""]
    L += [f"- {e['question']} → `{e['got']}` (expected `{e['expected']}`)" for e in rows[-1]["examples"]]
    return L


# ----------------------------------------------------------------------------- the run


def prepare_run_dir(run_dir: Path, force: bool):
    if run_dir.exists() and not run_dir.is_dir():
        raise LLMLabError(f"{run_dir} exists and is not a directory")
    if run_dir.is_dir() and any(run_dir.iterdir()):
        if not force:
            raise LLMLabError(f"{run_dir} is not empty; choose another --out or pass --force to replace it")
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)


def speedrun(out_dir: str | Path, preset: str = "default", force: bool = False, log=print,
             **overrides) -> Path:
    """Run every stage into `out_dir` and return the path of its report.md. Keyword overrides are
    SpeedrunConfig fields (people=..., max_steps=..., seed=...)."""
    import torch

    cfg = preset_config(preset, **overrides)
    run_dir = Path(out_dir)
    prepare_run_dir(run_dir, force)
    threads = torch.get_num_threads()
    auto = not cfg.threads
    cfg.threads = cfg.threads or auto_threads()
    torch.set_num_threads(cfg.threads)
    try:
        return _speedrun(run_dir, preset, cfg, log, threads_auto=auto)
    finally:
        torch.set_num_threads(threads)


def _speedrun(run_dir: Path, preset: str, cfg: SpeedrunConfig, log, threads_auto: bool) -> Path:
    load_start = " ".join(f"{x:.2f}" for x in os.getloadavg())
    t_start = time.perf_counter()
    stages = Stages(log)

    world, clean = stages.run("corpus", build_corpus, run_dir, cfg)
    stages.note("corpus", clean.docs_in, "documents/s")
    texts = read_texts(run_dir / "corpus" / "clean.jsonl")
    rng = random.Random(cfg.seed + 7)
    heldout = heldout_biographies(world, sorted(rng.sample(range(cfg.people), min(cfg.eval_people, cfg.people))))

    tok_stats = stages.run("tokenizer", train_tokenizer, run_dir, cfg, texts, heldout)
    stages.note("tokenizer", clean.bytes_kept, "bytes/s")

    from llmlab.data.pack import pack_documents
    manifest = stages.run("pack", pack_documents, texts, run_dir / "tokenizer", run_dir / "shards",
                          val_fraction=0.05, seed=cfg.seed)
    stages.note("pack", sum(manifest["tokens"].values()), "tokens/s")

    planned_steps, step_s = cfg.max_steps, None
    if cfg.time_budget:
        step_s = stages.run("trial steps", seconds_per_step, run_dir, cfg)
        stages.note("trial steps", 4 * cfg.micro_batch * cfg.seq_len, "tokens/s")
        steps = steps_within_budget(cfg, cfg.time_budget - (time.perf_counter() - t_start), step_s)
        if steps < cfg.max_steps:
            log(f"    a step takes {step_s:.2f} s here: {steps} steps instead of {cfg.max_steps} fit the "
                f"{cfg.time_budget:.0f} s budget")
            cfg = dataclasses.replace(cfg, max_steps=steps, eval_every=max(1, min(cfg.eval_every, steps // 4)))
    result, tcfg, mcfg = stages.run("pretrain", pretrain_model, run_dir, cfg)
    stages.note("pretrain", result.step * tcfg.tokens_per_step, "tokens/s")

    ev = stages.run("evaluate", evaluate, run_dir / "pretrain" / "model", cfg, world)
    stages.note("evaluate", ev["facts"]["probes"], "fact probes/s")

    # post-training: questions about the training people teach the answer format (SFT), then preferences (DPO);
    # the held-out people's questions test whether the model can say what it read but was never asked about
    n_qa = min(cfg.eval_people, cfg.people // 2)
    heldout_qa, trained_qa = qa_items(world, "test", n_qa), qa_items(world, "train", n_qa)
    sft = stages.run("sft", sft_model, run_dir, cfg, world, heldout_qa)
    stages.note("sft", sft["tokens"], "tokens/s")
    dpo = stages.run("dpo", dpo_model, run_dir, cfg, world, heldout_qa)
    stages.note("dpo", dpo["steps"] * cfg.micro_batch, "pairs/s")
    rows = stages.run("evaluate QA", stage_rows, run_dir, world, trained_qa, sft, dpo)
    stages.note("evaluate QA", 3 * len(trained_qa), "questions/s")
    copy_model(run_dir / "dpo" / "model", run_dir / "model")  # RUN_DIR/model is the run's final model

    from llmlab.train.loop import read_metrics
    records = read_metrics(run_dir / "pretrain" / "metrics.jsonl")
    train_rows = [r for r in records if "loss" in r]
    val_rows = [r for r in records if "val_loss" in r]
    tps = sorted(r["tok_per_s"] for r in train_rows)
    mfus = sorted(r["mfu"] for r in train_rows)
    tokens = result.step * tcfg.tokens_per_step
    summary = {
        "run_dir": str(run_dir), "preset": preset, "config": cfg.to_dict(),
        "corpus": clean.to_dict(),
        "tokenizer": tok_stats,
        "pretrain": {"params": mcfg.n_params(), "steps": result.step, "planned_steps": planned_steps,
                     "trial_seconds_per_step": step_s, "tokens_per_step": tcfg.tokens_per_step,
                     "tokens": tokens, "epochs": tokens / manifest["tokens"]["train"],
                     "data_tokens": manifest["tokens"],
                     "first_loss": train_rows[0]["loss"], "final_loss": train_rows[-1]["loss"],
                     "val_loss": val_rows[-1]["val_loss"], "val_bpb": val_rows[-1].get("val_bpb"),
                     "tokens_per_s": tps[len(tps) // 2], "mfu": mfus[len(mfus) // 2],
                     "samples": val_rows[-1].get("samples", [])},
        "eval": ev,
        "post_training": {"rows": rows, "qa_people": n_qa, "sft": sft, "dpo": dpo},
        "stages": stages.records,
        "machine": platform.processor() or platform.machine(),
        "threads": f"{cfg.threads}{' (auto)' if threads_auto else ''}",
        "load_average_start": load_start,
        "load_average": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    t = time.perf_counter()
    plot_stages(stages.records, run_dir / "stages.png")
    summary["stages"]["report"] = {"seconds": time.perf_counter() - t}
    summary["total_seconds"] = time.perf_counter() - t_start
    atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    # last: a run directory with a report.md is a finished run
    atomic_write_text(run_dir / "report.md", render_report(summary))
    log(f"done in {summary['total_seconds']:.0f} s: val {summary['pretrain']['val_bpb']:.3f} bits/byte, "
        f"facts {ev['facts']['mean_accuracy']:.1%} (baseline {ev['facts']['mean_baseline']:.1%}), "
        f"held-out QA {rows[0]['qa_heldout']:.1%} -> SFT {rows[1]['qa_heldout']:.1%} -> "
        f"DPO {rows[2]['qa_heldout']:.1%}; "
        f"report {run_dir / 'report.md'}; chat: llmlab chat --model {run_dir}")
    return run_dir / "report.md"


def auto_threads() -> int:
    """Torch threads for this machine right now: its cores minus those other processes keep busy (1-minute
    load average), at least 1. Torch's threads wait for each other after every operation, so one thread whose
    core is taken by another process stalls them all: on 2 shared cores, 2 threads measured 3-5x *slower*
    than 1."""
    import torch
    cores = torch.get_num_threads()
    return max(1, min(cores, cores - round(os.getloadavg()[0])))
