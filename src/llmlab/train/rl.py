"""Reinforcement learning from rewards: on-policy sampling with the engine, then PPO or GRPO updates.

Each step: sample `group_size` replies to each of `prompts_per_step` prompts (the engine, temperature 1),
score them (a Python function of the reply, i.e. a verifiable reward, or a reward model), compute the
log-probabilities of the sampled tokens under the policy as it was (old) and under the reference model, and
take `update_epochs` passes of clipped-ratio policy-gradient updates.

Checkpoints (every `save_every` steps, at the end and on Ctrl-C) hold the trainable weights, the optimizer, the
prompt sampler's and the global RNG states: `resume=True` continues from the last one exactly as if the run had
never stopped (rollouts are seeded per step, and the reference is rebuilt from the starting checkpoint).

GRPO: the advantage of a reply is its reward standardised within its group (no value function); the KL to the
reference is a loss term (the k3 estimator, as in DeepSeekMath). PPO: a value head on the policy's last hidden
state, per-token rewards -kl_coef * (log pi_old - log pi_ref) with the reward added at the last token, GAE
advantages, and a value loss. Under LoRA the reference is the same model with its adapter switched off.
"""

from __future__ import annotations

import copy
import hashlib
import json
import random
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn

from llmlab.engine import Engine, SamplingParams
from llmlab.errors import LLMLabError
from llmlab.train.chat_data import render_prompt, render_reply
from llmlab.train.ckpt import load_checkpoint, save_checkpoint, set_rng_state, step_dir_name
from llmlab.train.loop import CtrlC, MetricsLog, _in_main_thread, check_same_config, read_metrics
from llmlab.train.optim import lr_at, make_optimizer, set_lr


@dataclass
class RLConfig:
    algo: str = "grpo"  # "grpo" | "ppo"
    out_dir: str = "out_rl"
    steps: int = 50
    prompts_per_step: int = 8
    group_size: int = 4  # replies sampled per prompt
    max_new_tokens: int = 32
    temperature: float = 1.0
    lr: float = 1e-5
    min_lr: float = 1e-6
    warmup_steps: int = 0
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
    eval_every: int = 0  # 0: only before and after
    save_every: int = 10  # checkpoint every N steps (0: only at the end and on Ctrl-C)
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


# ---- forward helpers -------------------------------------------------------------------------------------


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


def token_logps(model, ids: torch.Tensor, with_entropy: bool = False):
    """log p(ids[:, t+1] | ids[:, :t+1]) for every t: (B, T-1); and the entropy of each next-token distribution."""
    logits = model(ids[:, :-1]).float()
    logp_all = torch.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, ids[:, 1:, None])[..., 0]
    if not with_entropy:
        return logp
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


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
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
    return ids


# ---- rollouts ------------------------------------------------------------------------------------------


def rollout(model, tokenizer, items: list[dict], cfg: RLConfig, seed: int, eot: int | None):
    """Sample group_size replies per item. Returns prompts, reply token lists (ending with the end-of-turn token
    when the model stopped) and reply texts, all flattened item-major."""
    engine = Engine(model, tokenizer)
    model.eval()
    prompts = [render_prompt(tokenizer, it["messages"]) for it in items for _ in range(cfg.group_size)]
    params = SamplingParams(temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens, seed=seed)
    done = engine.generate(prompts, params)
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


def masked_mean(x, mask):
    return (x * mask).sum() / mask.sum().clamp(min=1)


# ---- evaluation ----------------------------------------------------------------------------------------


@torch.no_grad()
def kl_to_reference(model, reference, tokenizer, prompts_messages: list[list[dict]], max_new_tokens: int = 32,
                    seed: int = 0) -> float:
    """Monte-Carlo KL(policy || reference) per reply: sample from the policy, average sum(log pi - log pi_ref)."""
    ref = reference if isinstance(reference, Reference) else None
    eot = end_of_turn_id(tokenizer)
    cfg = RLConfig(group_size=1, max_new_tokens=max_new_tokens)
    prompts, replies, _ = rollout(model, tokenizer, [{"messages": m} for m in prompts_messages], cfg, seed, eot)
    seqs = [p + r for p, r in zip(prompts, replies)]
    ids = pad_batch(seqs, 0)
    mask = reply_mask(prompts, replies, ids.shape[1])
    logp = token_logps(model, ids)
    ref_logp = ref.logps(ids) if ref is not None else token_logps(reference, ids)
    return float(((logp - ref_logp) * mask).sum(-1).mean())


def reply_mask(prompts, replies, T: int) -> torch.Tensor:
    """(B, T-1) over the target positions: True where the target token is a reply token."""
    mask = torch.zeros(len(prompts), T - 1, dtype=torch.bool)
    for i, (p, r) in enumerate(zip(prompts, replies)):
        mask[i, len(p) - 1:len(p) - 1 + len(r)] = True
    return mask


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


def trainable_state(module: nn.Module) -> dict:
    """What RL changes: the parameters that train (all of them, or only the LoRA adapter and value head)."""
    return {name: p.detach() for name, p in module.named_parameters() if p.requires_grad}


def prompts_digest(items: list[dict]) -> str:
    return hashlib.sha256(json.dumps([it["messages"] for it in items], sort_keys=True).encode()).hexdigest()


def rl_train(model, tokenizer, items: list[dict], cfg: RLConfig, reward_fn=None, reward_model=None, check=None,
             eval_items: list[dict] | None = None, resume: bool = False) -> dict:
    """Train `model` in place. reward_fn(reply_text, item) -> float (a verifiable reward) or reward_model
    (RewardModel, scores the reply) gives the reward; check(reply, item) -> bool is the verifiable score that is
    reported next to the reward-model score (to catch reward hacking). Returns before/after metrics and history
    ("interrupted": True, and no after, if Ctrl-C stopped it: continue with resume=True).

    `model` is always the starting policy (the reference is a copy of it); with resume=True the weights, optimizer
    and RNG states of the last checkpoint in cfg.out_dir/checkpoints are loaded on top.
    """
    cfg.validate()
    if reward_fn is None and reward_model is None:
        raise LLMLabError("RL needs a reward: a reward function or a reward model")
    if not items:
        raise LLMLabError("RL needs prompts")
    out = Path(cfg.out_dir)
    ckpt_dir = out / "checkpoints"
    saved = load_checkpoint(ckpt_dir) if ckpt_dir.exists() else None
    if saved is not None and not resume:
        raise LLMLabError(f"{out} already holds an RL run; pass --resume to continue it or choose another --out-dir")
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    log = MetricsLog(out / "metrics.jsonl", True)
    reference = Reference(model)  # before any saved weights are loaded: the reference is the starting policy
    value_head = ValueHead(model) if cfg.algo == "ppo" else None
    params_owner = nn.ModuleList([model] + ([value_head] if value_head is not None else []))
    optimizer = make_optimizer(params_owner, cfg.lr, cfg.weight_decay)
    eot = end_of_turn_id(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eot or 0)
    rng = random.Random(cfg.seed)  # which prompts each step, and the minibatch order
    run_state = {"rl_config": asdict(cfg), "model_config": model.config.to_dict(), "prompts": prompts_digest(items)}

    def rewards_for(texts, batch_items):
        if reward_fn is not None:
            return [float(reward_fn(t, it)) for t, it in zip(texts, batch_items)]
        return reward_model.score_batch([it["messages"] for it in batch_items], texts)

    start, history, before = 0, [], {}
    if saved is not None:
        model_state, optim_state, rng_states, state = saved
        where = ckpt_dir / step_dir_name(state["step"])
        check_same_config(state["rl_config"], asdict(cfg), where, "RL setting", RESUMABLE_CHANGES)
        check_same_config(state["model_config"], model.config.to_dict(), where, "model setting")
        if state["prompts"] != run_state["prompts"]:
            raise LLMLabError(f"cannot resume from {where}: it was trained on other prompts")
        loaded = params_owner.load_state_dict(model_state, strict=False)
        if loaded.unexpected_keys or set(trainable_state(params_owner)) != set(model_state):
            raise LLMLabError(f"cannot resume from {where}: its weights are not this model's trainable parameters "
                              "(was it trained with another --lora setting?)")
        optimizer.load_state_dict(optim_state)
        set_rng_state(rng_states)
        version, internal, gauss = state["sampler_rng"]
        rng.setstate((version, tuple(internal), gauss))
        start, before = state["step"], state["before"]
        log.truncate_after(start)
        history = [r for r in read_metrics(log.path) if "reward" in r] if log.path.exists() else []
    elif log.path.exists():
        log.path.unlink()

    def save(step: int):
        save_checkpoint(ckpt_dir, step, trainable_state(params_owner), optimizer.state_dict(),
                        {**run_state, "sampler_rng": rng.getstate(), "before": before}, cfg.keep_last)

    ctrl_c = CtrlC()  # Ctrl-C: finish the step in flight, save, leave; a second one aborts
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    previous_handler = signal.signal(signal.SIGINT, ctrl_c) if _in_main_thread() else None
    try:
        if saved is None:
            if eval_items:
                before = evaluate_items(model, tokenizer, eval_items, check, reward_model, cfg.max_new_tokens)
            log.write({"step": 0, **{f"eval_{k}": v for k, v in before.items()}})
        for step in range(start, cfg.steps):
            t0 = time.perf_counter()
            batch_items = [items[rng.randrange(len(items))] for _ in range(cfg.prompts_per_step)]
            prompts, replies, texts = rollout(model, tokenizer, batch_items, cfg, cfg.seed * 1_000_003 + step, eot)
            flat_items = [it for it in batch_items for _ in range(cfg.group_size)]
            R = torch.tensor(rewards_for(texts, flat_items))
            record = {"step": step + 1, "reward": R.mean().item()}
            if reward_model is not None and check is not None:  # watch for reward hacking
                record["verifiable_score"] = sum(bool(check(t, it)) for t, it in zip(texts, flat_items)) / len(texts)
            seqs = [p + r for p, r in zip(prompts, replies)]
            ids = pad_batch(seqs, pad)
            mask = reply_mask(prompts, replies, ids.shape[1])
            with torch.no_grad():
                old_logp = token_logps(model, ids)
                old_values = value_head.values() if value_head is not None else None
                ref_logp = reference.logps(ids)
            kl_tokens = (old_logp - ref_logp) * mask
            record["kl"] = kl_tokens.sum(-1).mean().item()
            record["response_length"] = sum(len(r) for r in replies) / len(replies)

            if cfg.algo == "grpo":
                groups = R.view(-1, cfg.group_size)
                adv_seq = (groups - groups.mean(1, keepdim=True)) / (groups.std(1, keepdim=True) + 1e-4)
                adv = adv_seq.view(-1, 1).expand_as(old_logp) * mask
                returns = None
            else:
                token_rewards = -cfg.kl_coef * kl_tokens
                last = torch.tensor([len(p) - 2 + len(r) for p, r in zip(prompts, replies)])
                token_rewards[torch.arange(len(seqs)), last] += R
                adv = gae(token_rewards, old_values, mask, cfg.gamma, cfg.lam)
                returns = adv + old_values
                # whitening the advantages over the batch keeps the step size independent of the reward scale
                adv = (adv - masked_mean(adv, mask)) * mask / (adv[mask].std() + 1e-8 if mask.sum() > 1 else 1.0)

            lr = lr_at(step, cfg.lr, cfg.min_lr, cfg.warmup_steps, cfg.steps)
            set_lr(optimizer, lr)
            model.train()
            sums = {"loss": 0.0, "entropy": 0.0, "clip_frac": 0.0}
            n_updates = 0
            order = list(range(len(seqs)))
            for _ in range(cfg.update_epochs):
                rng.shuffle(order)
                for i in range(0, len(order), cfg.minibatch):
                    mb = torch.tensor(order[i:i + cfg.minibatch])
                    m = mask[mb]
                    logp, entropy = token_logps(model, ids[mb], with_entropy=True)
                    ratio = torch.exp(logp - old_logp[mb])
                    a = adv[mb]
                    pg = -torch.min(ratio * a, ratio.clamp(1 - cfg.clip_eps, 1 + cfg.clip_eps) * a)
                    loss = masked_mean(pg, m)
                    if cfg.algo == "grpo":
                        log_r = ref_logp[mb] - logp
                        loss = loss + cfg.kl_coef * masked_mean(torch.exp(log_r) - log_r - 1, m)
                    else:
                        v = value_head.values()
                        loss = loss + cfg.vf_coef * 0.5 * masked_mean((v - returns[mb]) ** 2, m)
                    loss.backward()
                    if cfg.grad_clip > 0:
                        torch.nn.utils.clip_grad_norm_(params_owner.parameters(), cfg.grad_clip)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    sums["loss"] += loss.item()
                    sums["entropy"] += masked_mean(entropy.detach(), m).item()
                    sums["clip_frac"] += masked_mean(((ratio - 1).abs() > cfg.clip_eps).float(), m).item()
                    n_updates += 1
            record.update({k: v / n_updates for k, v in sums.items()})
            record.update(lr=lr, seconds=time.perf_counter() - t0)
            if eval_items and cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps:
                record.update({f"eval_{k}": v for k, v in
                               evaluate_items(model, tokenizer, eval_items, check, reward_model,
                                              cfg.max_new_tokens).items()})
            log.write(record)
            history.append(record)
            if ctrl_c.pressed or (cfg.save_every and (step + 1) % cfg.save_every == 0) or step + 1 == cfg.steps:
                save(step + 1)
            if ctrl_c.pressed:
                print(f"interrupted: saved step {step + 1} to {ckpt_dir}; continue with --resume", flush=True)
                break
        after, kl = {}, None
        if not ctrl_c.pressed:
            if eval_items:
                after = evaluate_items(model, tokenizer, eval_items, check, reward_model, cfg.max_new_tokens)
                kl = kl_to_reference(model, reference, tokenizer, [it["messages"] for it in eval_items],
                                     cfg.max_new_tokens)
            log.write({"step": cfg.steps, **{f"eval_{k}": v for k, v in after.items()}, "eval_kl": kl})
    finally:
        torch.set_num_threads(threads)
        if previous_handler is not None:
            signal.signal(signal.SIGINT, previous_handler)
        if value_head is not None:
            value_head.hook.remove()
    try:
        from llmlab.train.plots import plot_metrics
        plot_metrics(log.path, out / "rl.png")
    except Exception:  # a plot is a convenience; never lose a run over it
        pass
    model.eval()
    return {"before": before, "after": after, "kl": kl, "history": history, "config": asdict(cfg),
            "interrupted": ctrl_c.pressed}


def rl(model_path, cfg: RLConfig, task: str = "arithmetic", n_prompts: int = 256, n_eval: int = 64,
       reward_model_path=None, lora=None, resume: bool = False) -> dict:
    """`llmlab rl`: RL on a task family with its verifiable reward (or a reward model's score, reporting the
    verifiable score next to it). Writes cfg.out_dir/model (or /adapter), metrics.jsonl and results.json
    (not when interrupted: then cfg.out_dir/checkpoints holds where to resume from)."""
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
