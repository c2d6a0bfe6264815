"""Direct Preference Optimization (and IPO) on chosen/rejected pairs, as an objective of the one training loop.

The implicit reward of a reply is beta * (log pi(reply) - log pi_ref(reply)); DPO maximises the log-sigmoid of
the chosen-minus-rejected reward margin. The reference log-probabilities are computed once before training
(from the starting model), or, under LoRA, by the same model with its adapter switched off.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F

from llmlab.engine.scoring import token_logprobs
from llmlab.errors import LLMLabError
from llmlab.train import distributed as D
from llmlab.train.chat_data import RowBatches, collate_pairs, load_pairs, pair_rows
from llmlab.train.config import TrainConfig
from llmlab.train.loop import Objective, train
from llmlab.train.pretrain import model_device, unwrap
from llmlab.train.sft import LoRAConfig, load_base, pad_id_of, peak_memory_mb, prepare_model, save_result


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float = 0.1, loss_type: str = "sigmoid"):
    """Per-pair sequence log-probabilities in, (mean loss, chosen rewards, rejected rewards) out.

    sigmoid (DPO): -log sigmoid(beta * margin); ipo: (margin - 1 / (2 beta))^2, where margin is the difference
    of the chosen and rejected log-ratios log pi - log pi_ref."""
    chosen_ratio = policy_chosen - ref_chosen
    rejected_ratio = policy_rejected - ref_rejected
    margin = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * margin)
    elif loss_type == "ipo":
        losses = (margin - 1 / (2 * beta)) ** 2
    else:
        raise LLMLabError(f"unknown DPO loss {loss_type!r} (sigmoid or ipo)")
    return losses.mean(), beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def sequence_logps(model, ids: torch.Tensor, reply_mask: torch.Tensor) -> torch.Tensor:
    """Sum of log p(token) over the reply tokens of each row; ids (B, T), reply_mask (B, T) marks reply tokens."""
    return (token_logprobs(model(ids[:, :-1]), ids[:, 1:]) * reply_mask[:, 1:]).sum(-1)


@torch.no_grad()
def reference_logps(model, rows: list[tuple], pad_id: int, batch: int = 8) -> list[tuple[float, float]]:
    """(chosen, rejected) log-probabilities of every pair under `model` (the frozen starting point)."""
    was_training = model.training
    model.eval()
    out = []
    for i in range(0, len(rows), batch):
        ids, mask, _, _ = collate_pairs(rows[i:i + batch], pad_id)
        logps = sequence_logps(model, ids.to(model_device(model)), mask.to(model_device(model))).tolist()
        n = len(logps) // 2
        out += list(zip(logps[:n], logps[n:]))
    model.train(was_training)
    return out


def make_dpo_loss(beta: float, loss_type: str, reference: str):
    def loss_fn(model, batch):
        ids, mask, _, extra = batch
        device = model_device(model)
        ids, mask = ids.to(device), mask.to(device)
        logps = sequence_logps(model, ids, mask)
        n = ids.shape[0] // 2
        if reference == "adapter_off":
            from llmlab.model.lora import adapter_disabled
            with torch.no_grad(), adapter_disabled(unwrap(model)):
                ref = sequence_logps(model, ids, mask)
        else:
            ref = torch.tensor([e[0] for e in extra] + [e[1] for e in extra], device=device)
        loss, rc, rr = dpo_loss(logps[:n], logps[n:], ref[:n], ref[n:], beta, loss_type)
        return loss, {"reward_chosen": rc.mean().item(), "reward_rejected": rr.mean().item(),
                      "reward_margin": (rc - rr).mean().item(), "reward_accuracy": (rc > rr).float().mean().item()}
    return loss_fn


def make_dpo_eval(rows: list[tuple], pad_id: int, beta: float, loss_type: str, reference: str, cfg: TrainConfig):
    loss_fn = make_dpo_loss(beta, loss_type, reference)

    def evaluate(model) -> dict:
        sums, n = {}, 0
        for i in range(0, len(rows), cfg.micro_batch):
            loss, metrics = loss_fn(model, collate_pairs(rows[i:i + cfg.micro_batch], pad_id))
            for k, v in {"val_loss": loss.item(), **{f"val_{k}": v for k, v in metrics.items()}}.items():
                sums[k] = sums.get(k, 0.0) + v
            n += 1
        return {k: v / max(1, n) for k, v in sums.items()}

    return evaluate


def dpo_objective(model, pairs, tokenizer, cfg: TrainConfig, beta: float = 0.1, loss_type: str = "sigmoid",
                  reference: str = "precompute", val_pairs=None, d: D.Dist | None = None) -> Objective:
    d = d or D.Dist()
    pad = pad_id_of(tokenizer)
    if reference not in ("precompute", "adapter_off"):
        raise LLMLabError(f"unknown reference {reference!r} (precompute or adapter_off)")
    rows = pair_rows(pairs, cfg.seq_len)
    val_rows = pair_rows(val_pairs, cfg.seq_len) if val_pairs else None
    if reference == "precompute":
        rows = [r + ref for r, ref in zip(rows, reference_logps(model, rows, pad))]
        if val_rows:
            val_rows = [r + ref for r, ref in zip(val_rows, reference_logps(model, val_rows, pad))]
    batches = RowBatches(rows, cfg.micro_batch, cfg.grad_accum, cfg.seed, d.rank, d.world,
                         collate=lambda picked: collate_pairs(picked, pad))
    evaluate = make_dpo_eval(val_rows, pad, beta, loss_type, reference, cfg) if val_rows else None
    return Objective(loss_fn=make_dpo_loss(beta, loss_type, reference), batches=batches, evaluate=evaluate,
                     count_tokens=lambda batch: int(batch[2].sum()))


def dpo(model_path: str | Path, data: str | Path, cfg: TrainConfig, beta: float = 0.1, loss_type: str = "sigmoid",
        lora: LoRAConfig | None = None, reference: str = "precompute", val_data: str | Path | None = None,
        skip_bad: bool = False, resume: bool = False, tokenizer_path=None) -> dict:
    """DPO/IPO on a preference JSONL file; writes cfg.out_dir/model or cfg.out_dir/adapter; returns a summary."""
    if reference == "adapter_off" and lora is None:
        raise LLMLabError("--reference adapter_off needs --lora (without an adapter there is nothing to switch off)")
    d = D.setup()
    try:
        model, tokenizer, path = load_base(model_path, tokenizer_path)
        pairs, bad = load_pairs(data, tokenizer, skip_bad)
        val = load_pairs(val_data, tokenizer, skip_bad)[0] if val_data else None
        # reference log-probs come from the starting model, before any adapter or update
        objective = dpo_objective(model, pairs, tokenizer, cfg, beta, loss_type, reference, val, d)
        prepare_model(model, lora)
        t0 = time.perf_counter()
        extra = {"dpo_data": str(data), "beta": beta, "loss_type": loss_type, "reference": reference}
        result = train(model, objective, cfg, resume=resume, extra_state=extra, dist=d)
        out = None
        if not result.interrupted and d.is_main:
            out = save_result(result.model, tokenizer, Path(cfg.out_dir), lora, str(path))
        D.barrier(d)
        return {"path": out, "steps": result.step, "skipped_lines": bad, "seconds": time.perf_counter() - t0,
                "peak_memory_mb": peak_memory_mb(), "model": result.model, "tokenizer": tokenizer}
    finally:
        D.teardown(d)


def dpo_stage(model_path: str | Path, pairs_records: list[dict], eval_items: list[dict], cfg: TrainConfig, check,
              beta: float = 0.1, loss_type: str = "sigmoid", max_new_tokens: int = 32) -> dict:
    """For the speedrun: DPO on in-memory pairs; held-out verifiable accuracy before/after and the KL to the start.

    eval_items: [{"messages": [...], ...}], check(reply, item) -> bool."""
    from llmlab.checkpoint.load import load_checkpoint
    from llmlab.train.chat_data import preference_pair
    from llmlab.train.rl import kl_to_reference
    from llmlab.train.sft import answer
    import copy
    model, tokenizer, path = load_checkpoint(model_path)
    model = model.float()
    reference = copy.deepcopy(model).eval()

    def accuracy(m):
        replies = answer(m, tokenizer, [it["messages"] for it in eval_items], max_new_tokens)
        return sum(bool(check(r, it)) for r, it in zip(replies, eval_items)) / max(1, len(eval_items))

    before = accuracy(model)
    pairs = [preference_pair(r, tokenizer, f"pair {i}") for i, r in enumerate(pairs_records)]
    objective = dpo_objective(model, pairs, tokenizer, cfg, beta, loss_type)
    prepare_model(model, None)
    t0 = time.perf_counter()
    result = train(model, objective, cfg)
    after = accuracy(result.model)
    kl = kl_to_reference(result.model, reference, tokenizer, [it["messages"] for it in eval_items])
    out = save_result(result.model, tokenizer, Path(cfg.out_dir), None, str(path))
    return {"before": before, "after": after, "kl": kl, "path": str(out), "steps": result.step,
            "seconds": time.perf_counter() - t0}
