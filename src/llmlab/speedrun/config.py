"""The speedrun's settings and presets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from llmlab.errors import LLMLabError

AUGMENT = "multi,permute,fullname"
BIOS_PER_PERSON = 5  # of the 6 wordings per attribute; the 6th is held out to test knowledge, not wording


@dataclass
class SpeedrunConfig:
    people: int = 300
    seed: int = 0
    vocab_size: int = 2048
    # model (Llama-style; the vocabulary comes from the tokenizer)
    dim: int = 128
    n_layers: int = 4
    n_heads: int = 4
    hidden_dim: int = 344
    # training (a biography is ~70 tokens: 128-token rows waste no attention on long contexts)
    seq_len: int = 128
    micro_batch: int = 16
    max_steps: int = 1500  # ~28 epochs of the biographies
    # wall-clock budget of the whole run in seconds (0: none): pretraining takes fewer than max_steps steps when
    # the trial steps say max_steps would not fit (a busy machine), so the run still ends on time
    time_budget: float = 900
    lr: float = 2e-3
    min_lr: float = 2e-4
    warmup_steps: int = 100
    eval_every: int = 250
    threads: int = 0  # 0: the count that trained fastest in the trial steps (1 or all cores)
    # evaluation
    eval_people: int = 100  # people probed for facts / whose held-out biographies are scored / asked questions
    # post-training on bios QA: SFT on the training people's questions, then DPO on correct vs. wrong answers
    sft_steps: int = 250  # a step sees as many tokens as a pretraining step, in one-question rows: ~20 epochs
    sft_lr: float = 5e-4  # a quarter of pretraining's: a higher rate overwrites stored facts of held-out people
    dpo_steps: int = 40
    dpo_lr: float = 3e-5
    dpo_beta: float = 0.1
    progress: bool = True

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Budgets measured on a 2-core x86 CPU (see report.md "Time per stage" of a run for the actual numbers).
PRESETS = {
    # every stage, as small as still means something: the test suite runs it (well under a minute on a quiet
    # machine); one thread: a model this small gains nothing from two, and tests run side by side. It learns
    # too little in 60 steps to answer about held-out people, but SFT visibly teaches it the SFT'd people's answers.
    "ci": dict(people=40, vocab_size=512, dim=64, n_layers=2, n_heads=4, hidden_dim=172, micro_batch=8,
               max_steps=60, lr=3e-3, min_lr=3e-4, warmup_steps=10, eval_every=30, eval_people=12,
               sft_steps=80, sft_lr=3e-3, dpo_steps=20, time_budget=0, threads=1),
    # about 4 minutes: the default's recipe on fewer people
    "tiny": dict(people=120, vocab_size=1024, max_steps=500, warmup_steps=40, eval_every=125, eval_people=60,
                 sft_steps=120, dpo_steps=20, time_budget=270),
    # at most 15 minutes: see SpeedrunConfig
    "default": dict(),
}


def preset_config(preset: str = "default", **overrides) -> SpeedrunConfig:
    if preset not in PRESETS:
        raise LLMLabError(f"unknown speedrun preset {preset!r} (choose from {', '.join(PRESETS)})")
    fields_ = {**PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None}}
    unknown = set(fields_) - {f.name for f in dataclasses.fields(SpeedrunConfig)}
    if unknown:
        raise LLMLabError(f"unknown speedrun setting {sorted(unknown)[0]!r}")
    return SpeedrunConfig(**fields_)
