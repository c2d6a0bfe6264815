"""TrainConfig: every setting of a training run, RLConfig: every setting of an RL run, and model-size presets for
pretraining. No torch here: the CLI builds its flags from these dataclasses."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from llmlab.errors import LLMLabError


@dataclass
class TrainConfig:
    out_dir: str = "out"
    seed: int = 1337
    # batch: one optimizer step sees micro_batch * grad_accum * world_size sequences of seq_len tokens
    seq_len: int = 256
    micro_batch: int = 8
    grad_accum: int = 1
    max_steps: int = 1000
    # AdamW, linear warmup then cosine decay to min_lr
    lr: float = 3e-4
    min_lr: float = 3e-5
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0: no clipping
    # numerics
    dtype: str = "bfloat16"  # compute dtype under autocast; weights stay fp32 ("float32": no autocast)
    deterministic: bool = False  # torch.use_deterministic_algorithms: bit-exact resume
    compile: bool = False
    threads: int = 0  # CPU threads for torch (0: torch's default)
    fsdp: bool = False  # under torchrun: shard parameters with FSDP2 instead of replicating them (DDP)
    # evaluation, logging, checkpoints
    eval_every: int = 100
    eval_batches: int = 8
    sample_every: int = 0  # 0: sample whenever evaluating (needs a tokenizer)
    sample_tokens: int = 32
    num_samples: int = 2
    log_every: int = 1
    save_every: int = 500
    keep_last: int = 2
    progress: bool = True
    peak_flops: float = 0.0  # 0: measure the device's matmul peak once and cache it

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def tokens_per_step(self) -> int:
        return self.micro_batch * self.grad_accum * self.seq_len

    def validate(self):
        for name in ("seq_len", "micro_batch", "grad_accum", "max_steps"):
            if getattr(self, name) < 1:
                raise LLMLabError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.dtype not in ("bfloat16", "float32"):
            raise LLMLabError(f"dtype must be bfloat16 or float32, not {self.dtype!r}")
        if self.min_lr > self.lr:
            raise LLMLabError(f"min_lr ({self.min_lr}) is above lr ({self.lr})")
        return self


@dataclass
class RLConfig:
    """The settings of llmlab.train.rl (PPO or GRPO). Here rather than in rl.py, which imports torch, so that the
    `llmlab rl` flags are built from these fields without it."""
    algo: str = "grpo"  # "grpo" | "ppo"
    out_dir: str = "out_rl"
    steps: int = 50  # rollouts
    prompts_per_step: int = 8
    group_size: int = 4  # replies sampled per prompt
    max_new_tokens: int = 32
    temperature: float = 1.0
    lr: float = 1e-5
    min_lr: float = 1e-6
    warmup_steps: int = 0  # in rollouts
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    kl_coef: float = 0.04  # beta: weight of the KL to the reference
    clip_eps: float = 0.2  # PPO's ratio clip
    update_epochs: int = 1  # passes over each rollout
    minibatch: int = 8  # sequences per gradient step of an update
    gamma: float = 1.0  # PPO discount
    lam: float = 0.95  # PPO GAE lambda
    vf_coef: float = 0.1  # PPO value loss weight
    seed: int = 0
    threads: int = 0
    eval_every: int = 0  # in rollouts; 0: only before and after
    save_every: int = 10  # checkpoint every N rollouts (0: only at the end and on Ctrl-C)
    keep_last: int = 1  # checkpoints kept

    def validate(self):
        if self.algo not in ("grpo", "ppo"):
            raise LLMLabError(f"unknown RL algorithm {self.algo!r} (grpo or ppo)")
        if self.algo == "grpo" and self.group_size < 2:
            raise LLMLabError("GRPO needs group_size >= 2 (advantages are relative within a group)")
        for name in ("steps", "prompts_per_step", "group_size", "max_new_tokens", "update_epochs", "minibatch"):
            if getattr(self, name) < 1:
                raise LLMLabError(f"{name} must be at least 1, got {getattr(self, name)}")
        return self

    @property
    def updates_per_rollout(self) -> int:
        sequences = self.prompts_per_step * self.group_size
        return self.update_epochs * -(-sequences // self.minibatch)

    def train_config(self) -> TrainConfig:
        """The loop's settings: counts of rollouts become counts of optimizer updates. Weights stay fp32 without
        autocast, because PPO's ratios live on small differences of log-probabilities."""
        n = self.updates_per_rollout
        return TrainConfig(out_dir=self.out_dir, seed=self.seed, seq_len=self.max_new_tokens,
                           micro_batch=self.minibatch, max_steps=self.steps * n, lr=self.lr, min_lr=self.min_lr,
                           warmup_steps=self.warmup_steps * n, weight_decay=self.weight_decay,
                           grad_clip=self.grad_clip, dtype="float32", threads=self.threads,
                           eval_every=self.eval_every * n, save_every=self.save_every * n, keep_last=self.keep_last,
                           progress=False)

# Settings a resumed run may change without changing what it computes (where it writes, how often it talks).
RESUMABLE_CHANGES = {"out_dir", "eval_every", "eval_batches", "sample_every", "sample_tokens", "num_samples",
                     "log_every", "save_every", "keep_last", "progress", "peak_flops", "compile", "max_steps", "threads"}

# Model-size presets (Llama-style: RoPE, SwiGLU, RMSNorm); vocab_size comes from the data.
PRESETS = {
    "tiny": dict(dim=64, n_layers=2, n_heads=4, hidden_dim=172),  # tests and smoke runs: seconds
    "small": dict(dim=256, n_layers=4, n_heads=4, hidden_dim=688),  # a few M params: minutes on a CPU
    "30m": dict(dim=384, n_layers=6, n_heads=6, hidden_dim=1024),  # ~30M with a 32k vocab
    "medium": dict(dim=512, n_layers=8, n_heads=8, hidden_dim=1376),
}
