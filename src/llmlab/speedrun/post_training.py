"""The speedrun's stages after pretraining: SFT and DPO on bios QA, and the QA scores of every stage's checkpoint."""

from __future__ import annotations

import shutil
from pathlib import Path

from llmlab.speedrun.config import SpeedrunConfig


# DPO's figures are measured on the first pairs and questions only: scoring every pair twice (policy and reference)
# and sampling a reply per question cost as much as DPO's training on a busy machine; 240 pairs (40 people) put a
# share's standard error under 3.3 points.
SCORED_PAIRS = 240
KL_PROMPTS = 120


def finetune_config(out_dir: Path, cfg: SpeedrunConfig, steps: int, lr: float, dtype: str, seq_len: int,
                    micro_batch: int):
    from llmlab.train.config import TrainConfig
    return TrainConfig(out_dir=str(out_dir), seed=cfg.seed, seq_len=seq_len, micro_batch=micro_batch,
                       max_steps=steps, lr=lr, min_lr=lr / 10, warmup_steps=max(1, steps // 10), weight_decay=0.0,
                       eval_every=0, log_every=1, save_every=0, keep_last=1, progress=cfg.progress,
                       threads=cfg.threads, dtype=dtype)


def loss_ends(metrics: Path) -> dict:
    from llmlab.train.loop import read_metrics
    losses = [r["loss"] for r in read_metrics(metrics) if "loss" in r]
    return {"first_loss": losses[0], "final_loss": losses[-1]}


def sft_model(run_dir: Path, cfg: SpeedrunConfig, world) -> dict:
    """SFT the pretrained model on every question about the training people, the answer tokens carrying the loss.
    One question per row: packed rows put a person's other answers in the context, and the model learns to read
    them off there instead of recalling them from the name. Rows are short, so a step takes many of them (as many
    tokens as a pretraining step)."""
    from llmlab.checkpoint.load import load_checkpoint
    from llmlab.train.chat_data import conversations_to_examples
    from llmlab.train.loop import train
    from llmlab.train.sft import prepare_model, save_result, sft_objective
    from llmlab.train.tasks import bios_qa_items, sft_conversations

    model, tokenizer, path = load_checkpoint(run_dir / "pretrain" / "model")
    conversations = [r["messages"] for r in sft_conversations(bios_qa_items(world, "train"))]
    examples = conversations_to_examples(conversations, tokenizer)
    qa_len = max(len(ids) for ids, _ in examples)
    tcfg = finetune_config(run_dir / "sft", cfg, cfg.sft_steps, cfg.sft_lr, "bfloat16", qa_len,
                           max(1, cfg.micro_batch * cfg.seq_len // qa_len))
    result = train(prepare_model(model.float(), None), sft_objective(examples, tokenizer, tcfg, pack=False), tcfg)
    save_result(result.model, tokenizer, run_dir / "sft", None, str(path))
    return {"steps": result.step, "conversations": len(conversations), "rows_per_step": tcfg.micro_batch,
            "row_tokens": qa_len, "tokens": result.step * tcfg.tokens_per_step,
            **loss_ends(run_dir / "sft" / "metrics.jsonl")}


def dpo_model(run_dir: Path, cfg: SpeedrunConfig, world, heldout_qa: list[dict]) -> dict:
    """DPO from the SFT model (also its reference) on pairs for the training people: the right answer against
    another person's value of the same attribute. Reports the KL to the reference on held-out questions and the
    implicit reward on the training pairs and on the same kind of pairs for the held-out people."""
    import copy

    from llmlab.checkpoint.load import load_checkpoint
    from llmlab.eval.knowledge import implicit_rewards, preference_pairs
    from llmlab.train.chat_data import preference_pair
    from llmlab.train.dpo import dpo_objective
    from llmlab.train.loop import train
    from llmlab.train.rl import kl_to_reference
    from llmlab.train.sft import prepare_model, save_result
    from llmlab.train.tasks import bios_qa_items

    model, tokenizer, path = load_checkpoint(run_dir / "sft" / "model")
    model = model.float()
    reference = copy.deepcopy(model).eval()
    records = preference_pairs(world, bios_qa_items(world, "train"), cfg.seed)
    pairs = [preference_pair(r, tokenizer, f"pair {i}") for i, r in enumerate(records)]
    # float32: the reference log-probabilities are, and at step 1 the policy's must equal them (margin 0)
    tcfg = finetune_config(run_dir / "dpo", cfg, cfg.dpo_steps, cfg.dpo_lr, "float32", cfg.seq_len, cfg.micro_batch)
    objective = dpo_objective(model, pairs, tokenizer, tcfg, cfg.dpo_beta)
    policy = train(prepare_model(model, None), objective, tcfg).model.eval()
    save_result(policy, tokenizer, run_dir / "dpo", None, str(path))
    heldout_pairs = preference_pairs(world, heldout_qa[:SCORED_PAIRS], cfg.seed)
    return {"steps": cfg.dpo_steps, "pairs": len(pairs), **loss_ends(run_dir / "dpo" / "metrics.jsonl"),
            "kl": kl_to_reference(policy, reference, tokenizer, [it["messages"] for it in heldout_qa[:KL_PROMPTS]]),
            "train_pairs": implicit_rewards(policy, reference, tokenizer, records[:SCORED_PAIRS], cfg.dpo_beta,
                                            cfg.seq_len),
            "heldout_pairs": implicit_rewards(policy, reference, tokenizer, heldout_pairs, cfg.dpo_beta,
                                              cfg.seq_len)}


def score_checkpoints(run_dir: Path, world, trained_qa: list[dict], heldout_qa: list[dict],
                      known_bios: list[str]) -> list[dict]:
    """Each stage's checkpoint: QA exact match on SFT'd and on held-out people, answers of the right kind, and
    bits per byte of held-out wordings of known people's biographies (does finetuning erase what was stored?)."""
    from llmlab.checkpoint.load import load_checkpoint
    from llmlab.eval.knowledge import document_scores, qa_scores

    rows = []
    for stage in ("pretrain", "sft", "dpo"):
        model, tokenizer, _ = load_checkpoint(run_dir / stage / "model")
        model = model.float().eval()
        trained = qa_scores(model, tokenizer, world, trained_qa)
        heldout = qa_scores(model, tokenizer, world, heldout_qa)
        rows.append({"stage": stage, "path": f"{stage}/model", "qa_trained": trained["exact_match"],
                     "right_kind": trained["right_kind"], "qa_heldout": heldout["exact_match"],
                     "heldout_right_kind": heldout["right_kind"],
                     "known_bios_bpb": document_scores(model, tokenizer, known_bios)["bits_per_byte"],
                     "examples": trained["examples"], "heldout_examples": heldout["examples"]})
    return rows


def copy_model(src: Path, dst: Path):
    """dst becomes a copy of the checkpoint directory src, atomically."""
    from llmlab.io import new_temp_dir, replace_dir
    tmp = new_temp_dir(dst)
    shutil.copytree(src, tmp, dirs_exist_ok=True)
    replace_dir(tmp, dst)
