"""Alignment on a task family with checkable answers: a reward model, DPO and GRPO (and optionally PPO) on
SmolLM2-135M-Instruct (or any chat checkpoint). Reports the verifiable held-out score before and after each
stage, the KL to the starting model, the reward model's held-out pairwise accuracy, and, for RL driven by the
reward model, its score next to the verifiable one (reward hacking shows as the first rising alone).

A score that starts at 0 cannot move under GRPO (every reply in a group gets reward 0, so every advantage is 0),
and SmolLM2-135M-Instruct scores 0 on every family zero-shot (it wraps JSON in code fences, restates the
question before the number). So each prompt opens with `shots` solved demonstration turns (fixed items from
another seed, shared by training and held-out prompts): with 3 of them the model follows the JSON format and
what is left is getting the sum right, a score in the middle that both DPO and GRPO can move.

    python experiments/align.py [--model smollm2] [--family json_format] [--shots 3] [--dpo-steps 24] [--rl-steps 16]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import bar_plot, write_results  # noqa: E402

from llmlab.checkpoint.load import load_checkpoint  # noqa: E402
from llmlab.train import tasks  # noqa: E402
from llmlab.train.chat_data import pair_rows, preference_pair  # noqa: E402
from llmlab.train.config import TrainConfig  # noqa: E402
from llmlab.train.dpo import dpo_objective  # noqa: E402
from llmlab.train.loop import train  # noqa: E402
from llmlab.train.reward import RewardModel, pairwise_accuracy, reward_objective, save_reward_model, to_reward_model  # noqa: E402
from llmlab.train.rl import Reference, RLConfig, evaluate_items, kl_to_reference, rl_train  # noqa: E402
from llmlab.train.sft import LoRAConfig, pad_id_of, prepare_model  # noqa: E402

DEMO_SEED = 12345  # the demonstrations come from neither the training (seed) nor the held-out (seed + 1) items


def with_demonstrations(items: list[dict], family: str, shots: int) -> list[dict]:
    """Prefix every item's messages with `shots` solved examples of the family as earlier chat turns."""
    demos = tasks.make_tasks(family, shots, seed=DEMO_SEED) if shots else []
    turns = [m for d in demos for m in (d["messages"][0], {"role": "assistant", "content": d["answer"]})]
    return [dict(it, messages=turns + it["messages"]) for it in items]


def run(model_name="smollm2", family="json_format", n_train=256, n_eval=48, rm_steps=24, dpo_steps=24, rl_steps=16,
        ppo=False, rl_with_rm=False, out="experiments/results/align", threads=1, max_new_tokens=16, seed=0,
        prompts_per_step=4, group_size=4, micro_batch=4, keep_adapter=False, shots=3, lora_r=16,
        dpo_lr=2e-4, rl_lr=1e-4, rm_lr=5e-5, beta=0.1):
    out = Path(out)
    torch.set_num_threads(threads)
    train_items = with_demonstrations(tasks.make_tasks(family, n_train, seed=seed), family, shots)
    eval_items = with_demonstrations(tasks.make_tasks(family, n_eval, seed=seed + 1), family, shots)
    train_pairs_raw = tasks.preference_pairs(train_items, seed)
    eval_pairs_raw = tasks.preference_pairs(eval_items, seed + 1)
    lora = LoRAConfig(r=lora_r, alpha=2.0 * lora_r)
    common = dict(seq_len=320, micro_batch=micro_batch, eval_every=0, save_every=0, progress=False, threads=threads,
                  peak_flops=1e12, keep_last=1, weight_decay=0.0)

    def fresh():
        model, tokenizer, _ = load_checkpoint(model_name)
        return model.float(), tokenizer

    def measure(model, tokenizer, reward_model=None):
        return evaluate_items(model, tokenizer, eval_items, tasks.check, reward_model, max_new_tokens)

    rows = []
    t0 = time.perf_counter()
    base, tokenizer = fresh()
    before = measure(base, tokenizer)
    rows.append({"stage": "base", "heldout_score": before["score"], "seconds": round(time.perf_counter() - t0)})
    print(rows[-1], flush=True)
    train_pairs = [preference_pair(r, tokenizer) for r in train_pairs_raw]
    eval_pairs = [preference_pair(r, tokenizer) for r in eval_pairs_raw]

    # reward model: full finetune of the base with a scalar head, on the training pairs
    t0 = time.perf_counter()
    rm_model = base
    to_reward_model(rm_model).train().requires_grad_(True)
    cfg = TrainConfig(out_dir=str(out / "rm"), max_steps=rm_steps, lr=rm_lr, min_lr=rm_lr / 10, warmup_steps=3,
                      **common)
    rm_model = train(rm_model, reward_objective(train_pairs, tokenizer, cfg), cfg).model.eval()
    rm_acc = pairwise_accuracy(rm_model, pair_rows(eval_pairs, cfg.seq_len), pad_id_of(tokenizer))
    save_reward_model(rm_model, out / "reward_model", tokenizer, pad_id_of(tokenizer))
    reward_model = RewardModel.load(out / "reward_model")
    rows.append({"stage": "reward model", "rm_heldout_pairwise_accuracy": rm_acc,
                 "seconds": round(time.perf_counter() - t0)})
    print(rows[-1], flush=True)
    del rm_model, base

    # DPO with a LoRA adapter; the reference is the same model with the adapter switched off
    t0 = time.perf_counter()
    model, _ = fresh()
    cfg = TrainConfig(out_dir=str(out / "dpo"), max_steps=dpo_steps, lr=dpo_lr, min_lr=dpo_lr / 10, warmup_steps=3,
                      **common)
    # reference log-probs are precomputed (before LoRA) for the pairs the run will see: one pass over them
    objective = dpo_objective(model, train_pairs[:dpo_steps * micro_batch], tokenizer, cfg, beta=beta)
    prepare_model(model, lora)
    reference = Reference(model)
    model = train(model, objective, cfg).model.eval()
    after = measure(model, tokenizer, reward_model)
    metrics = [r for r in _read_jsonl(out / "dpo" / "metrics.jsonl") if "reward_accuracy" in r]
    rows.append({"stage": "DPO (LoRA)", "heldout_score": after["score"], "rm_score": after["rm_score"],
                 "kl_to_start": kl_to_reference(model, reference, tokenizer, [it["messages"] for it in eval_items],
                                                max_new_tokens),
                 "train_pair_accuracy_last": metrics[-1]["reward_accuracy"] if metrics else None,
                 "seconds": round(time.perf_counter() - t0)})
    print(rows[-1], flush=True)
    if keep_adapter:
        from llmlab.model.lora import save_adapter
        save_adapter(model, out / "adapter", base_model_name_or_path=str(model_name))
    del model, reference

    # RL: GRPO with the verifiable reward (and PPO / reward-model-driven GRPO when asked), LoRA as for DPO
    runs = [("GRPO (LoRA, verifiable reward)", "grpo", False)]
    if ppo:
        runs.append(("PPO (LoRA, verifiable reward)", "ppo", False))
    if rl_with_rm:
        runs.append(("GRPO (LoRA, reward model)", "grpo", True))
    for name, algo, use_rm in runs:
        t0 = time.perf_counter()
        model, _ = fresh()
        prepare_model(model, lora)
        rl_cfg = RLConfig(algo=algo, out_dir=str(out / (name.split()[0].lower() + ("_rm" if use_rm else ""))),
                          steps=rl_steps, prompts_per_step=prompts_per_step, group_size=group_size,
                          max_new_tokens=max_new_tokens, lr=rl_lr, min_lr=rl_lr / 10, kl_coef=0.04,
                          minibatch=micro_batch * 2, threads=threads, seed=seed)
        res = rl_train(model, tokenizer, train_items, rl_cfg, reward_fn=None if use_rm else tasks.reward,
                       reward_model=reward_model if use_rm else None, check=tasks.check, eval_items=eval_items)
        rm_after = measure(model, tokenizer, reward_model)["rm_score"]
        half = max(1, len(res["history"]) // 2)
        mean = lambda hs: sum(h["reward"] for h in hs) / len(hs)
        rows.append({"stage": name, "heldout_score": res["after"]["score"], "rm_score": rm_after,
                     "kl_to_start": res["kl"], "train_reward_first_half": mean(res["history"][:half]),
                     "train_reward_second_half": mean(res["history"][half:] or res["history"]),
                     "seconds": round(time.perf_counter() - t0)})
        print(rows[-1], flush=True)
        del model
    note = (f"{model_name}, task family '{family}' with {shots} solved demonstration turns before each question: "
            f"{n_train} training items, {n_eval} held-out items (greedy, exact check). Reward model: full finetune, "
            f"{rm_steps} steps of {micro_batch} pairs (lr {rm_lr}). DPO: LoRA r={lora_r}, {dpo_steps} steps of "
            f"{micro_batch} pairs (lr {dpo_lr}, beta {beta}). GRPO: LoRA r={lora_r}, {rl_steps} steps of "
            f"{prompts_per_step} prompts x {group_size} samples (lr {rl_lr}, KL coef 0.04). kl_to_start: Monte-Carlo "
            "KL(policy || start) in nats per held-out reply. CPU, one thread, shared machine")
    for stage in ("rm", "dpo"):  # weights + AdamW state: GBs, not results (metrics.jsonl stays)
        shutil.rmtree(out / stage / "checkpoints", ignore_errors=True)
    shutil.rmtree(out / "reward_model", ignore_errors=True)
    write_results(out, "align", rows, note)
    scored = [r for r in rows if "heldout_score" in r]
    bar_plot(out / "align.png", [r["stage"].split(" (")[0] for r in scored],
             {"held-out verifiable score": [r["heldout_score"] for r in scored]},
             f"{model_name}: {family} ({shots}-shot), reward model held-out acc {rm_acc:.2f}", "accuracy")
    return rows


def _read_jsonl(path: Path) -> list[dict]:
    import json
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2")
    p.add_argument("--family", default="json_format")
    p.add_argument("--shots", type=int, default=3)
    p.add_argument("--n-train", type=int, default=256)
    p.add_argument("--n-eval", type=int, default=48)
    p.add_argument("--rm-steps", type=int, default=24)
    p.add_argument("--dpo-steps", type=int, default=24)
    p.add_argument("--rl-steps", type=int, default=16)
    p.add_argument("--dpo-lr", type=float, default=2e-4)
    p.add_argument("--rl-lr", type=float, default=1e-4)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--ppo", action="store_true")
    p.add_argument("--rl-with-rm", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--prompts-per-step", type=int, default=4)
    p.add_argument("--group-size", type=int, default=4)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--out", default="experiments/results/align")
    a = p.parse_args()
    run(a.model, a.family, a.n_train, a.n_eval, a.rm_steps, a.dpo_steps, a.rl_steps, a.ppo, a.rl_with_rm, a.out,
        a.threads, a.max_new_tokens, prompts_per_step=a.prompts_per_step, group_size=a.group_size,
        micro_batch=a.micro_batch, shots=a.shots, lora_r=a.lora_r, dpo_lr=a.dpo_lr, rl_lr=a.rl_lr)
