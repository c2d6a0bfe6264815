"""Alignment on a task family with checkable answers: a reward model, DPO and GRPO (and optionally PPO) on
SmolLM2-135M-Instruct (or any chat checkpoint). Reports the verifiable held-out score before and after each
stage, the KL to the starting model, the reward model's held-out pairwise accuracy, and, for RL driven by the
reward model, its score next to the verifiable one (reward hacking shows as the first rising alone).

    python experiments/align.py [--model smollm2] [--family json_format] [--dpo-steps 30] [--rl-steps 20] [--out DIR]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import bar_plot, write_results  # noqa: E402

from llmlab.api import load_checkpoint  # noqa: E402
from llmlab.train import tasks  # noqa: E402
from llmlab.train.chat_data import preference_pair  # noqa: E402
from llmlab.train.config import TrainConfig  # noqa: E402
from llmlab.train.dpo import dpo_objective  # noqa: E402
from llmlab.train.loop import train  # noqa: E402
from llmlab.train.reward import RewardModel, pairwise_accuracy, reward_objective, save_reward_model, to_reward_model  # noqa: E402
from llmlab.train.chat_data import pair_rows  # noqa: E402
from llmlab.train.rl import Reference, RLConfig, evaluate_items, kl_to_reference, rl_train  # noqa: E402
from llmlab.train.sft import pad_id_of, prepare_model  # noqa: E402


def run(model_name="smollm2", family="json_format", n_train=256, n_eval=48, rm_steps=40, dpo_steps=30, rl_steps=20,
        ppo=False, rl_with_rm=False, out="experiments/results/align", threads=1, max_new_tokens=24, seed=0,
        prompts_per_step=8, group_size=4, micro_batch=8, keep_reward_model=False):
    out = Path(out)
    torch.set_num_threads(threads)
    train_items = tasks.make_tasks(family, n_train, seed=seed)
    eval_items = tasks.make_tasks(family, n_eval, seed=seed + 1)
    train_pairs_raw = tasks.preference_pairs(train_items, seed)
    eval_pairs_raw = tasks.preference_pairs(eval_items, seed + 1)
    common = dict(seq_len=256, micro_batch=micro_batch, eval_every=0, save_every=0, progress=False, threads=threads,
                  peak_flops=1e12, keep_last=1, weight_decay=0.0)

    def fresh():
        model, tokenizer, _ = load_checkpoint(model_name)
        return model.float(), tokenizer

    def measure(model, tokenizer, reward_model=None):
        return evaluate_items(model, tokenizer, eval_items, tasks.check, reward_model, max_new_tokens)

    rows = []
    base, tokenizer = fresh()
    before = measure(base, tokenizer)
    rows.append({"stage": "base", "heldout_score": before["score"]})
    print(rows[-1], flush=True)
    train_pairs = [preference_pair(r, tokenizer) for r in train_pairs_raw]
    eval_pairs = [preference_pair(r, tokenizer) for r in eval_pairs_raw]

    # reward model
    rm_model, _ = fresh()
    to_reward_model(rm_model).train().requires_grad_(True)
    cfg = TrainConfig(out_dir=str(out / "rm"), max_steps=rm_steps, lr=5e-5, min_lr=5e-6, warmup_steps=5, **common)
    rm_model = train(rm_model, reward_objective(train_pairs, tokenizer, cfg), cfg, resume=True).model.eval()
    rm_acc = pairwise_accuracy(rm_model, pair_rows(eval_pairs, cfg.seq_len), pad_id_of(tokenizer))
    save_reward_model(rm_model, out / "reward_model", tokenizer, pad_id_of(tokenizer))
    reward_model = RewardModel.load(out / "reward_model")
    rows.append({"stage": "reward model", "rm_heldout_pairwise_accuracy": rm_acc})
    print(rows[-1], flush=True)
    del rm_model

    # DPO
    model, _ = fresh()
    cfg = TrainConfig(out_dir=str(out / "dpo"), max_steps=dpo_steps, lr=1e-5, min_lr=1e-6, warmup_steps=3, **common)
    objective = dpo_objective(model, train_pairs, tokenizer, cfg, beta=0.1)
    reference = Reference(model)
    prepare_model(model, None)
    model = train(model, objective, cfg, resume=True).model.eval()
    after = measure(model, tokenizer, reward_model)
    rows.append({"stage": "DPO", "heldout_score": after["score"], "rm_score": after["rm_score"],
                 "kl_to_start": kl_to_reference(model, reference, tokenizer, [it["messages"] for it in eval_items],
                                                max_new_tokens)})
    print(rows[-1], flush=True)
    del model, reference

    # RL: GRPO with the verifiable reward (and PPO / reward-model-driven GRPO when asked)
    runs = [("GRPO (verifiable reward)", "grpo", False)]
    if ppo:
        runs.append(("PPO (verifiable reward)", "ppo", False))
    if rl_with_rm:
        runs.append(("GRPO (reward model)", "grpo", True))
    for name, algo, use_rm in runs:
        model, _ = fresh()
        prepare_model(model, None)
        rl_cfg = RLConfig(algo=algo, out_dir=str(out / (name.split()[0].lower() + ("_rm" if use_rm else ""))),
                          steps=rl_steps, prompts_per_step=prompts_per_step, group_size=group_size, max_new_tokens=max_new_tokens,
                          lr=5e-6, min_lr=5e-7, kl_coef=0.04, minibatch=micro_batch, threads=threads, seed=seed)
        res = rl_train(model, tokenizer, train_items, rl_cfg, reward_fn=None if use_rm else tasks.reward,
                       reward_model=reward_model if use_rm else None, check=tasks.check, eval_items=eval_items)
        rm_after = measure(model, tokenizer, reward_model)["rm_score"]
        rows.append({"stage": name, "heldout_score": res["after"]["score"], "rm_score": rm_after,
                     "kl_to_start": res["kl"], "train_reward_first": res["history"][0]["reward"],
                     "train_reward_last": res["history"][-1]["reward"]})
        print(rows[-1], flush=True)
        del model
    note = (f"{model_name}, task family '{family}': {n_train} training items, {n_eval} held-out items (greedy, exact "
            f"check); RM {rm_steps} steps, DPO {dpo_steps} steps (beta 0.1), RL {rl_steps} steps of {prompts_per_step} prompts x "
            f"{group_size} samples; CPU, shared machine")
    import shutil
    for stage in ("rm", "dpo"):  # weights + AdamW state: GBs, not results (metrics.jsonl stays)
        shutil.rmtree(out / stage / "checkpoints", ignore_errors=True)
    if not keep_reward_model:
        shutil.rmtree(out / "reward_model", ignore_errors=True)
    write_results(out, "align", rows, note)
    scored = [r for r in rows if "heldout_score" in r]
    bar_plot(out / "align.png", [r["stage"].split(" (")[0] for r in scored],
             {"held-out verifiable score": [r["heldout_score"] for r in scored]}, f"{model_name}: {family}", "accuracy")
    return rows


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2")
    p.add_argument("--family", default="json_format")
    p.add_argument("--n-train", type=int, default=256)
    p.add_argument("--n-eval", type=int, default=48)
    p.add_argument("--rm-steps", type=int, default=40)
    p.add_argument("--dpo-steps", type=int, default=30)
    p.add_argument("--rl-steps", type=int, default=20)
    p.add_argument("--ppo", action="store_true")
    p.add_argument("--rl-with-rm", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--prompts-per-step", type=int, default=8)
    p.add_argument("--group-size", type=int, default=4)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--out", default="experiments/results/align")
    a = p.parse_args()
    run(a.model, a.family, a.n_train, a.n_eval, a.rm_steps, a.dpo_steps, a.rl_steps, a.ppo, a.rl_with_rm, a.out,
        a.threads, a.max_new_tokens, prompts_per_step=a.prompts_per_step, group_size=a.group_size,
        micro_batch=a.micro_batch)
