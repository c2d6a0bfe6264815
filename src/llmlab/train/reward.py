"""Reward model: the transformer with a scalar head, trained with the Bradley-Terry loss on chosen/rejected pairs.

The head replaces the language-model head (lm_head: dim -> vocab becomes score: dim -> 1) and is read at the
last non-pad token, exactly as transformers' LlamaForSequenceClassification does, and it is saved in that
layout (config.json with num_labels 1, score.weight), so transformers loads it as a sequence classifier.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmlab.checkpoint.hf import from_hf_names, read_safetensors, safetensors_files, write_checkpoint_dir
from llmlab.errors import LLMLabError
from llmlab.model.config import ModelConfig
from llmlab.model.transformer import Transformer, rope_inv_freq
from llmlab.train import distributed as D
from llmlab.train.chat_data import RowBatches, collate_pairs, load_pairs, pair_rows, render_prompt, render_reply
from llmlab.train.config import TrainConfig
from llmlab.train.loop import Objective, train
from llmlab.train.pretrain import model_device
from llmlab.train.sft import load_base, pad_id_of, peak_memory_mb


def to_reward_model(model: Transformer) -> Transformer:
    """Swap the LM head for a zero-initialised scalar score head; model(ids) then gives (B, T, 1) scores."""
    w = model.lm_head.weight
    model.lm_head = nn.Linear(model.config.dim, 1, bias=False, device=w.device, dtype=w.dtype)
    nn.init.zeros_(model.lm_head.weight)  # every reply starts at score 0: the loss starts at log 2
    model.config.extra_hf = {**model.config.extra_hf, "num_labels": 1}
    return model


def last_token_index(ids: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Index of the last token that is not padding (transformers' rule for sequence classification)."""
    positions = torch.arange(ids.shape[1], device=ids.device)
    return (positions * (ids != pad_id)).argmax(-1)


def scores(model, ids: torch.Tensor, pad_id: int) -> torch.Tensor:
    out = model(ids)[..., 0].float()  # (B, T)
    return out.gather(1, last_token_index(ids, pad_id)[:, None])[:, 0]


def make_rm_loss(pad_id: int):
    def loss_fn(model, batch):
        ids = batch[0].to(model_device(model))
        s = scores(model, ids, pad_id)
        n = ids.shape[0] // 2
        margin = s[:n] - s[n:]
        loss = -F.logsigmoid(margin).mean()  # Bradley-Terry: P(chosen > rejected) = sigmoid(r_c - r_r)
        return loss, {"accuracy": (margin > 0).float().mean().item(), "margin": margin.mean().item()}
    return loss_fn


@torch.no_grad()
def pairwise_accuracy(model, rows, pad_id: int, batch: int = 8) -> float:
    correct = 0
    for i in range(0, len(rows), batch):
        ids = collate_pairs(rows[i:i + batch], pad_id)[0].to(model_device(model))
        s = scores(model, ids, pad_id)
        n = ids.shape[0] // 2
        correct += int((s[:n] > s[n:]).sum())
    return correct / max(1, len(rows))


def reward_objective(pairs, tokenizer, cfg: TrainConfig, val_pairs=None, d: D.Dist | None = None) -> Objective:
    d = d or D.Dist()
    pad = pad_id_of(tokenizer)
    rows = pair_rows(pairs, cfg.seq_len)
    val_rows = pair_rows(val_pairs, cfg.seq_len) if val_pairs else None
    evaluate = (lambda model: {"val_accuracy": pairwise_accuracy(model, val_rows, pad)}) if val_rows else None
    batches = RowBatches(rows, cfg.micro_batch, cfg.grad_accum, cfg.seed, d.rank, d.world,
                         collate=lambda picked: collate_pairs(picked, pad))
    return Objective(loss_fn=make_rm_loss(pad), batches=batches, evaluate=evaluate,
                     count_tokens=lambda batch: int(batch[2].sum()))


def save_reward_model(model: Transformer, path: str | Path, tokenizer=None, pad_id: int | None = None) -> Path:
    """A transformers LlamaForSequenceClassification directory (num_labels 1): model.* weights + score.weight."""
    cfg = model.config
    if cfg.hf_model_type not in ("llama", "mistral", "qwen2"):
        raise LLMLabError(f"reward models are saved as Llama-family sequence classifiers, not {cfg.hf_model_type}")
    hf = cfg.to_hf()
    arch = {"llama": "LlamaForSequenceClassification", "mistral": "MistralForSequenceClassification",
            "qwen2": "Qwen2ForSequenceClassification"}[cfg.hf_model_type]
    hf.update(architectures=[arch], num_labels=1, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0},
              pad_token_id=pad_id if pad_id is not None else cfg.pad_token_id, torch_dtype="float32",
              tie_word_embeddings=False)
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    score = sd.pop("lm_head.weight")
    # llmlab names are Llama names: the backbone needs no renaming
    sd = {k: v.to("cpu", torch.float32).contiguous() for k, v in sd.items()}
    sd["score.weight"] = score.to("cpu", torch.float32).contiguous()
    return write_checkpoint_dir(path, sd, hf, tokenizer)


class RewardModel:
    """A saved reward model that scores (prompt, response) pairs: RewardModel.load(dir).score(prompt, response)."""

    def __init__(self, model: Transformer, tokenizer, pad_id: int):
        self.model, self.tokenizer, self.pad_id = model.eval(), tokenizer, pad_id

    @classmethod
    def load(cls, path: str | Path) -> "RewardModel":
        from llmlab.tokenizer import Tokenizer
        path = Path(path)
        if not (path / "config.json").is_file():
            raise LLMLabError(f"{path} is not a reward model directory (no config.json)")
        hf = json.loads((path / "config.json").read_text())
        if hf.get("num_labels") != 1 or not any(a.endswith("ForSequenceClassification")
                                                for a in hf.get("architectures", [])):
            raise LLMLabError(f"{path} is not a reward model (expected a sequence classifier with num_labels 1)")
        cfg = ModelConfig.load(path)
        cfg.tie_embeddings = False
        sd = from_hf_names(read_safetensors(safetensors_files(path)), cfg)
        sd["lm_head.weight"] = sd.pop("score.weight")
        with torch.device("meta"):
            model = to_reward_model(Transformer(cfg))
        model.load_state_dict(sd, assign=True)
        model.inv_freq = rope_inv_freq(cfg)
        return cls(model, Tokenizer.from_dir(path), hf.get("pad_token_id") or 0)

    @torch.no_grad()
    def score_ids(self, sequences: list[list[int]]) -> list[float]:
        T = max(len(s) for s in sequences)
        ids = torch.full((len(sequences), T), self.pad_id, dtype=torch.long)
        for i, s in enumerate(sequences):
            ids[i, :len(s)] = torch.tensor(s)
        return scores(self.model, ids.to(model_device(self.model)), self.pad_id).tolist()

    def score_batch(self, prompts: list, responses: list[str]) -> list[float]:
        """Scores for (prompt, response) pairs; a prompt is a user message string or a list of messages."""
        seqs = []
        for p, r in zip(prompts, responses):
            messages = [{"role": "user", "content": p}] if isinstance(p, str) else p
            seqs.append(render_prompt(self.tokenizer, messages) + render_reply(self.tokenizer, messages, r))
        return self.score_ids(seqs)

    def score(self, prompt, response: str) -> float:
        return self.score_batch([prompt], [response])[0]


def train_reward(model_path: str | Path, data: str | Path, cfg: TrainConfig, val_data: str | Path | None = None,
                 skip_bad: bool = False, resume: bool = False, tokenizer_path=None) -> dict:
    """Train a reward model from a checkpoint on preference pairs; writes cfg.out_dir/reward_model.
    Returns {"path", "steps", "val_accuracy" (held-out pairwise accuracy, None without val data), ...}."""
    d = D.setup()
    try:
        model, tokenizer, path = load_base(model_path, tokenizer_path)
        pairs, bad = load_pairs(data, tokenizer, skip_bad)
        val = load_pairs(val_data, tokenizer, skip_bad)[0] if val_data else None
        to_reward_model(model).train()
        for p in model.parameters():
            p.requires_grad_(True)
        objective = reward_objective(pairs, tokenizer, cfg, val, d)
        t0 = time.perf_counter()
        result = train(model, objective, cfg, resume=resume, extra_state={"reward_data": str(data)}, dist=d)
        pad = pad_id_of(tokenizer)
        acc = None
        if val:
            result.model.eval()
            acc = pairwise_accuracy(result.model, pair_rows(val, cfg.seq_len), pad)
        out = None
        if not result.interrupted and d.is_main:
            out = save_reward_model(result.model, Path(cfg.out_dir) / "reward_model", tokenizer, pad)
        D.barrier(d)
        return {"path": out, "steps": result.step, "val_accuracy": acc, "skipped_lines": bad,
                "seconds": time.perf_counter() - t0, "peak_memory_mb": peak_memory_mb(), "model": result.model}
    finally:
        D.teardown(d)
