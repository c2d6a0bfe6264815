"""Reinforcement learning from rewards (PPO or GRPO), as an objective of the one training loop.

The batch source is rollouts: each round samples `group_size` replies to each of `prompts_per_step` prompts with
the engine, scores them (a Python function of the reply, i.e. a verifiable reward, or a reward model), takes
the log-probabilities of the sampled tokens under the policy as it is (old) and the reference, the advantages,
and serves the rollout as minibatches, `update_epochs` shuffled passes; the loss is the clipped-ratio policy
gradient. One RL step (a rollout) is `updates_per_rollout` loop steps, and the loop saves (and stops on Ctrl-C)
only between rollouts (Objective.steps_per_round), so a resumed run continues exactly as if it had never stopped
(rollouts are seeded per round, and the reference is rebuilt from the starting checkpoint).

GRPO: the advantage of a reply is its reward standardised within its group (no value function); the KL to the
reference is a loss term (the k3 estimator, as in DeepSeekMath). PPO: a value head on the policy's last hidden
state, per-token rewards -kl_coef * (log pi_old - log pi_ref) with the reward added at the last token, GAE
advantages, and a value loss; the head is a submodule of the policy while it trains, so the loop's one optimizer
and its checkpoints hold it. Under LoRA the reference is the same model with its adapter switched off.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn

from llmlab.engine import Engine, SamplingParams
from llmlab.engine.scoring import token_logprobs
from llmlab.errors import LLMLabError
from llmlab.train import distributed as D
from llmlab.train.chat_data import render_prompt, render_reply
from llmlab.train.ckpt import read_latest_name
from llmlab.train.config import RLConfig, TrainConfig  # noqa: F401 (RLConfig: imported from here too)
from llmlab.train.loop import Objective, train
from llmlab.train.metrics import MetricsLog, read_metrics


class ValueHead(nn.Module):
    """A scalar value per position, read off the policy's final hidden state (captured with a forward hook)."""

    def __init__(self, model):
        super().__init__()
        self.head = nn.Linear(model.config.dim, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.hidden = None
        self.hook = model.model.norm.register_forward_hook(self._capture)

    def _capture(self, module, inputs, output):
        self.hidden = output

    def values(self) -> torch.Tensor:
        return self.head(self.hidden.float())[..., 0]


def token_logps(model, ids: torch.Tensor) -> torch.Tensor:
    """log p(ids[:, t+1] | ids[:, :t+1]) for every t: (B, T-1)."""
    return token_logprobs(model(ids[:, :-1]), ids[:, 1:])


class Reference:
    """log-probabilities under the reference policy: a frozen copy, or the same model with the LoRA adapter off."""

    def __init__(self, model):
        from llmlab.model.lora import lora_layers
        self.model = model
        self.lora = bool(lora_layers(model))
        self.copy = None if self.lora else copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def logps(self, ids):
        if self.lora:
            from llmlab.model.lora import adapter_disabled
            with adapter_disabled(self.model):
                return token_logps(self.model, ids)
        return token_logps(self.copy, ids)


def end_of_turn_id(tokenizer) -> int | None:
    reply = render_reply(tokenizer, [{"role": "user", "content": "hi"}], "ok")
    stops = [t for t in reply if t in tokenizer.stop_token_ids]
    return stops[-1] if stops else None


def pad_batch(seqs: list[list[int]], pad_id: int):
    return nn.utils.rnn.pad_sequence([torch.tensor(s) for s in seqs], batch_first=True, padding_value=pad_id)


def reply_mask(prompts, replies, T: int) -> torch.Tensor:
    """(B, T-1) over the target positions: True where the target token is a reply token."""
    mask = torch.zeros(len(prompts), T - 1, dtype=torch.bool)
    for i, (p, r) in enumerate(zip(prompts, replies)):
        mask[i, len(p) - 1:len(p) - 1 + len(r)] = True
    return mask


def masked_mean(x, mask):
    return (x * mask).sum() / mask.sum().clamp(min=1)


# ---- rollouts: the batch source ---------------------------------------------------------------------------


def rollout(model, tokenizer, items: list[dict], cfg: RLConfig, seed: int, eot: int | None):
    """Sample group_size replies per item, from the random streams seed, seed + 1, ... Returns prompts, reply
    token lists (ending with the end-of-turn token when the model stopped) and reply texts, all item-major."""
    engine = Engine(model, tokenizer)
    model.eval()
    unique = [render_prompt(tokenizer, it["messages"]) for it in items]
    prompts = [p for p in unique for _ in range(cfg.group_size)]
    done = []
    for j, prompt in enumerate(unique):
        # one call per prompt: within a call the engine draws sample i of every prompt from the same stream
        # seed + i, and a near-uniform policy then gave every prompt nearly the same group of replies
        params = SamplingParams(temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens,
                                seed=seed + j * cfg.group_size)
        done += engine.generate([prompt], params, n=cfg.group_size)
    replies = []
    for c in done:
        tokens = list(c.token_ids)
        if c.finish_reason == "stop" and c.completion_tokens > len(tokens) and eot is not None:
            tokens.append(eot)  # the stop token is part of what the policy chose
        replies.append(tokens or ([eot] if eot is not None else [tokenizer.eos_token_id or 0]))
    return prompts, replies, [c.text for c in done]


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """Generalised advantage estimates over the reply positions (mask), right to left; rows are right-padded."""
    B, T = rewards.shape
    adv = torch.zeros_like(rewards)
    last = torch.zeros(B)
    next_value = torch.zeros(B)
    for t in reversed(range(T)):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = torch.where(m, delta + gamma * lam * last, last)
        next_value = torch.where(m, values[:, t], next_value)
        adv[:, t] = torch.where(m, last, torch.zeros(()))
    return adv


@dataclass
class Minibatch:
    ids: torch.Tensor  # (B, T) prompt + reply, right-padded
    mask: torch.Tensor  # (B, T-1) reply targets
    old_logp: torch.Tensor  # (B, T-1) under the policy that sampled the rollout
    ref_logp: torch.Tensor
    adv: torch.Tensor  # (B, T-1) advantages, 0 off the reply
    returns: torch.Tensor | None  # PPO: the value targets
    stats: dict  # the whole rollout's reward, KL to the reference, reply length: logged with every update

    def __getitem__(self, rows):
        pick = lambda t: None if t is None else t[rows]
        return Minibatch(self.ids[rows], self.mask[rows], self.old_logp[rows], self.ref_logp[rows],
                         self.adv[rows], pick(self.returns), self.stats)


class Rollouts:
    """The RL batch source: a fresh rollout every updates_per_rollout steps, served as shuffled minibatches.

    score(texts, items) -> rewards; check(text, item) -> bool, when given with a reward model, is logged next to
    it as the verifiable score (reward hacking shows as the reward rising alone). The prompt sampler and the
    minibatch order share one seeded RNG, whose state (with the round count) is where the source is."""

    def __init__(self, model, tokenizer, items: list[dict], cfg: RLConfig, score, reference: Reference,
                 value_head: ValueHead | None, check=None):
        self.model, self.tokenizer, self.items, self.cfg = model, tokenizer, items, cfg
        self.score, self.reference, self.value_head, self.check = score, reference, value_head, check
        self.eot = end_of_turn_id(tokenizer)
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (self.eot or 0)
        self.rng = random.Random(cfg.seed)
        self.rounds = 0
        self.queue: list[Minibatch] = []

    def __next__(self) -> Minibatch:
        if not self.queue:
            data = self.make_rollout()
            order = list(range(len(data.ids)))
            for _ in range(self.cfg.update_epochs):
                self.rng.shuffle(order)
                self.queue += [data[order[i:i + self.cfg.minibatch]] for i in range(0, len(order), self.cfg.minibatch)]
        return self.queue.pop(0)

    def state_dict(self) -> dict:
        assert not self.queue, "an RL batch source is saved only between rollouts (Objective.steps_per_round)"
        return {"rounds": self.rounds, "sampler_rng": self.rng.getstate()}

    def load_state_dict(self, state: dict):
        version, internal, gauss = state["sampler_rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        self.rounds, self.queue = state["rounds"], []

    @torch.no_grad()
    def make_rollout(self) -> Minibatch:
        cfg, model = self.cfg, self.model
        items = [self.items[self.rng.randrange(len(self.items))] for _ in range(cfg.prompts_per_step)]
        seed = (cfg.seed * 1_000_003 + self.rounds) * cfg.prompts_per_step * cfg.group_size  # streams of its own
        prompts, replies, texts = rollout(model, self.tokenizer, items, cfg, seed, self.eot)
        self.rounds += 1
        flat_items = [it for it in items for _ in range(cfg.group_size)]
        R = torch.tensor(self.score(texts, flat_items), dtype=torch.float32)
        ids = pad_batch([p + r for p, r in zip(prompts, replies)], self.pad)
        mask = reply_mask(prompts, replies, ids.shape[1])
        old_logp = token_logps(model, ids)  # in eval mode, as the engine sampled (no dropout)
        old_values = self.value_head.values() if self.value_head is not None else None
        ref_logp = self.reference.logps(ids)
        model.train()
        kl_tokens = (old_logp - ref_logp) * mask
        stats = {"reward": R.mean().item(), "kl": kl_tokens.sum(-1).mean().item(),
                 "response_length": sum(len(r) for r in replies) / len(replies)}
        if self.check is not None:
            stats["verifiable_score"] = sum(bool(self.check(t, it)) for t, it in zip(texts, flat_items)) / len(texts)
        if cfg.algo == "grpo":
            groups = R.view(-1, cfg.group_size)
            adv_seq = (groups - groups.mean(1, keepdim=True)) / (groups.std(1, keepdim=True) + 1e-4)
            return Minibatch(ids, mask, old_logp, ref_logp, adv_seq.view(-1, 1).expand_as(old_logp) * mask, None,
                             stats)
        token_rewards = -cfg.kl_coef * kl_tokens
        last = torch.tensor([len(p) - 2 + len(r) for p, r in zip(prompts, replies)])
        token_rewards[torch.arange(len(ids)), last] += R
        adv = gae(token_rewards, old_values, mask, cfg.gamma, cfg.lam)
        returns = adv + old_values
        # whitening the advantages over the batch keeps the step size independent of the reward scale
        adv = (adv - masked_mean(adv, mask)) * mask / (adv[mask].std() + 1e-8 if mask.sum() > 1 else 1.0)
        return Minibatch(ids, mask, old_logp, ref_logp, adv, returns, stats)


def make_policy_loss(cfg: RLConfig, value_head: ValueHead | None):
    """The loop's loss of one minibatch: clipped-ratio policy gradient, plus GRPO's KL term or PPO's value loss."""

    def loss_fn(model, mb: Minibatch):
        device = next(model.parameters()).device
        ids, m = mb.ids.to(device), mb.mask.to(device)
        logits = model(ids[:, :-1])
        logp = token_logprobs(logits, ids[:, 1:])
        ratio = torch.exp(logp - mb.old_logp.to(device))
        a = mb.adv.to(device)
        loss = masked_mean(-torch.min(ratio * a, ratio.clamp(1 - cfg.clip_eps, 1 + cfg.clip_eps) * a), m)
        if cfg.algo == "grpo":
            log_r = mb.ref_logp.to(device) - logp
            loss = loss + cfg.kl_coef * masked_mean(torch.exp(log_r) - log_r - 1, m)
        else:
            loss = loss + cfg.vf_coef * 0.5 * masked_mean((value_head.values() - mb.returns.to(device)) ** 2, m)
        with torch.no_grad():
            entropy = torch.distributions.Categorical(logits=logits.float()).entropy()
            clipped = ((ratio - 1).abs() > cfg.clip_eps).float()
        return loss, {**mb.stats, "entropy": masked_mean(entropy, m).item(),
                      "clip_frac": masked_mean(clipped, m).item()}

    return loss_fn


# ---- evaluation ----------------------------------------------------------------------------------------


@torch.no_grad()
def kl_to_reference(model, reference, tokenizer, prompts_messages: list[list[dict]], max_new_tokens: int = 32,
                    seed: int = 0) -> float:
    """Monte-Carlo KL(policy || reference) per reply: sample from the policy, average sum(log pi - log pi_ref)."""
    ref = reference if isinstance(reference, Reference) else None
    eot = end_of_turn_id(tokenizer)
    cfg = RLConfig(group_size=1, max_new_tokens=max_new_tokens)
    prompts, replies, _ = rollout(model, tokenizer, [{"messages": m} for m in prompts_messages], cfg, seed, eot)
    ids = pad_batch([p + r for p, r in zip(prompts, replies)], 0)
    ref_logp = ref.logps(ids) if ref is not None else token_logps(reference, ids)
    return float(((token_logps(model, ids) - ref_logp) * reply_mask(prompts, replies, ids.shape[1])).sum(-1).mean())


@torch.no_grad()
def evaluate_items(model, tokenizer, items: list[dict], check=None, reward_model=None, max_new_tokens: int = 32):
    """Greedy replies to held-out items: verifiable accuracy (check) and mean reward-model score, when given."""
    from llmlab.train.sft import answer
    replies = answer(model, tokenizer, [it["messages"] for it in items], max_new_tokens)
    out = {}
    if check is not None:
        out["score"] = sum(bool(check(r, it)) for r, it in zip(replies, items)) / max(1, len(items))
    if reward_model is not None:
        out["rm_score"] = sum(reward_model.score_batch([it["messages"] for it in items], replies)) / max(1, len(items))
    return out


# ---- training ------------------------------------------------------------------------------------------


# Settings a resumed run may change without changing the steps it has already taken (`steps` changes the
# learning-rate schedule from there on, as max_steps does for pretraining).
RESUMABLE_CHANGES = {"out_dir", "steps", "threads", "eval_every", "save_every", "keep_last"}


def prompts_digest(items: list[dict]) -> str:
    return hashlib.sha256(json.dumps([it["messages"] for it in items], sort_keys=True).encode()).hexdigest()


def rl_train(model, tokenizer, items: list[dict], cfg: RLConfig, reward_fn=None, reward_model=None, check=None,
             eval_items: list[dict] | None = None, resume: bool = False) -> dict:
    """Train `model` in place through the one loop. reward_fn(reply_text, item) -> float (a verifiable reward) or
    reward_model (RewardModel, scores the reply) gives the reward; check(reply, item) -> bool is the verifiable
    score that is reported next to the reward-model score (to catch reward hacking). Returns before/after
    metrics and the history: the loop's metrics lines, one per optimizer update, each with its rollout's reward,
    KL and reply length ("interrupted": True, and no after, if Ctrl-C stopped it: continue with resume=True).

    `model` is always the starting policy (the reference is a copy of it); with resume=True the loop loads the
    weights, optimizer and RNG states of the last checkpoint in cfg.out_dir/checkpoints on top.
    """
    cfg.validate()
    if reward_fn is None and reward_model is None:
        raise LLMLabError("RL needs a reward: a reward function or a reward model")
    if not items:
        raise LLMLabError("RL needs prompts")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise LLMLabError("RL runs in one process: start it without torchrun")
    log = MetricsLog(Path(cfg.out_dir) / "metrics.jsonl", True)

    def evaluate(m) -> dict:
        scores = evaluate_items(m, tokenizer, eval_items, check, reward_model, cfg.max_new_tokens)
        return {f"eval_{k}": v for k, v in scores.items()}

    if read_latest_name(Path(cfg.out_dir) / "checkpoints") is None:  # a new run
        Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
        log.path.unlink(missing_ok=True)
        log.write({"step": 0, **(evaluate(model) if eval_items else {})})
    before = {k.removeprefix("eval_"): v for r in read_metrics(log.path) if r.get("step") == 0
              for k, v in r.items() if k.startswith("eval_")} if log.path.exists() else {}

    reference = Reference(model)  # before any saved weights are loaded: the reference is the starting policy
    value_head = None
    if cfg.algo == "ppo":  # a submodule while training: the loop's optimizer and checkpoints then hold it
        value_head = model.value_head = ValueHead(model)

    def score(texts, batch_items):
        if reward_fn is not None:
            return [float(reward_fn(t, it)) for t, it in zip(texts, batch_items)]
        return reward_model.score_batch([it["messages"] for it in batch_items], texts)

    batches = Rollouts(model, tokenizer, items, cfg, score, reference, value_head,
                       check if reward_model is not None else None)
    objective = Objective(loss_fn=make_policy_loss(cfg, value_head), batches=batches,
                          evaluate=evaluate if eval_items and cfg.eval_every else None,
                          count_tokens=lambda mb: int(mb.mask.sum()), steps_per_round=cfg.updates_per_rollout)
    extra = {"rl_config": {k: v for k, v in asdict(cfg).items() if k not in RESUMABLE_CHANGES},
             "prompts": prompts_digest(items),
             "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    try:
        result = train(model, objective, cfg.train_config(), resume=resume, extra_state=extra, dist=D.Dist())
    finally:
        if value_head is not None:
            value_head.hook.remove()
            del model.value_head
    model.eval()
    after, kl = {}, None
    if not result.interrupted and eval_items:
        after = evaluate(model)
        kl = kl_to_reference(model, reference, tokenizer, [it["messages"] for it in eval_items], cfg.max_new_tokens)
        log.write({"step": result.step, **after, "eval_kl": kl})
    return {"before": before, "after": {k.removeprefix("eval_"): v for k, v in after.items()}, "kl": kl,
            "history": [r for r in read_metrics(log.path) if "reward" in r], "config": asdict(cfg),
            "interrupted": result.interrupted}


def rl(model_path, cfg: RLConfig, task: str = "arithmetic", n_prompts: int = 256, n_eval: int = 64,
       reward_model_path=None, lora=None, resume: bool = False) -> dict:
    """`llmlab rl`: RL on a task family with its verifiable reward (or a reward model's score, reporting the
    verifiable score next to it). Writes cfg.out_dir/model (or /adapter), metrics.jsonl, loss.png (the reward
    curve) and results.json (not when interrupted: then cfg.out_dir/checkpoints holds where to resume from)."""
    from llmlab.train import tasks
    from llmlab.train.sft import load_base, prepare_model, save_result
    model, tokenizer, path = load_base(model_path)
    prepare_model(model, lora)
    items = tasks.make_tasks(task, n_prompts, seed=cfg.seed)
    eval_items = tasks.make_tasks(task, n_eval, seed=cfg.seed + 10_000)
    reward_model = None
    if reward_model_path:
        from llmlab.train.reward import RewardModel
        reward_model = RewardModel.load(reward_model_path)
        if reward_model.tokenizer.vocab_size != tokenizer.vocab_size:
            raise LLMLabError("the reward model's tokenizer does not match the policy's")
    result = rl_train(model, tokenizer, items, cfg, reward_fn=None if reward_model else tasks.reward,
                      reward_model=reward_model, check=tasks.check, eval_items=eval_items, resume=resume)
    if result["interrupted"]:
        result["path"] = None
        return result
    result["path"] = str(save_result(model, tokenizer, Path(cfg.out_dir), lora, str(path)))
    from llmlab.io import atomic_write_text
    atomic_write_text(Path(cfg.out_dir) / "results.json",
                      json.dumps({k: v for k, v in result.items() if k != "history"}, indent=2) + "\n")
    return result
