"""Pretraining: next-token prediction on packed token shards, as one objective of the training loop."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from llmlab.data.pack import load_manifest, load_shards
from llmlab.errors import LLMLabError
from llmlab.model import ModelConfig, Transformer
from llmlab.train import distributed as D
from llmlab.train.config import PRESETS, TrainConfig
from llmlab.train.loop import Objective, train


class TokenBatches:
    """Contiguous (x, y) windows read in order from a token memmap; this rank's share of each global step.

    One optimizer step covers rows = micro_batch * grad_accum * world consecutive windows of seq_len + 1
    tokens. Rank r's micro-batch m takes rows (m * world + r) * micro_batch onwards: the ranks' slices are
    disjoint and together they are exactly the rows a single process with the same global batch reads.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, micro_batch: int, grad_accum: int, rank: int = 0,
                 world: int = 1):
        self.tokens, self.seq_len, self.micro_batch = tokens, seq_len, micro_batch
        self.grad_accum, self.rank, self.world = grad_accum, rank, world
        self.rows_per_step = micro_batch * grad_accum * world
        self.span = self.rows_per_step * seq_len
        if len(tokens) < self.span + 1:
            raise LLMLabError(f"only {len(tokens)} training tokens; one step needs {self.span + 1} "
                              "(lower --seq-len, --micro-batch or --grad-accum)")
        self.position, self.epoch, self.micro = 0, 0, 0

    def __iter__(self):
        return self

    def __next__(self):
        first_row = (self.micro * self.world + self.rank) * self.micro_batch
        start = self.position + first_row * self.seq_len
        n = self.micro_batch * self.seq_len
        chunk = torch.from_numpy(self.tokens[start:start + n + 1].astype(np.int64))
        x = chunk[:-1].view(self.micro_batch, self.seq_len)
        # targets are the next tokens; each row's last target is the first token of the next row
        y = chunk[1:].view(self.micro_batch, self.seq_len)
        self.micro += 1
        if self.micro == self.grad_accum:
            self.micro = 0
            self.position += self.span
            if self.position + self.span + 1 > len(self.tokens):
                self.position, self.epoch = 0, self.epoch + 1
        return x, y

    def state_dict(self) -> dict:
        return {"position": self.position, "epoch": self.epoch, "micro": self.micro}

    def load_state_dict(self, state: dict):
        self.position, self.epoch, self.micro = state["position"], state["epoch"], state["micro"]


def cross_entropy(logits, targets):
    """Mean next-token loss, computed in fp32: a bf16 log-softmax over a large vocabulary loses too much."""
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1))


# Eagerly, the fp32 upcast, log-softmax and their backward are five passes over (tokens x vocab) floats, a third
# of a CPU training step at a 32k vocabulary; compiled, they fuse into about two (measured 3x faster). Used when
# the model is compiled too (TrainConfig.compile), so eager runs pay no compilation time.
compiled_cross_entropy = torch.compile(cross_entropy, dynamic=False)


def lm_loss(model, batch):
    x, y = batch
    x, y = x.to(model_device(model)), y.to(model_device(model))
    logits = model(x)
    loss = (compiled_cross_entropy if hasattr(model, "_orig_mod") else cross_entropy)(logits, y)
    aux = getattr(unwrap(model), "aux_loss", None)
    if unwrap(model).config.n_experts:
        return loss + unwrap(model).config.moe_aux_loss_coef * aux, {"aux_loss": aux.item()}
    return loss, {}


def unwrap(model):
    model = getattr(model, "_orig_mod", model)  # torch.compile
    return getattr(model, "module", model)  # DDP


def model_device(model) -> torch.device:
    return next(unwrap(model).parameters()).device


def load_tokenizer(tokenizer_dir: str | Path | None):
    if tokenizer_dir is None:
        return None
    from tokenizers import Tokenizer
    path = Path(tokenizer_dir)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise LLMLabError(f"no tokenizer.json at {path}")
    return Tokenizer.from_file(str(file))


def bytes_per_token(manifest: dict, val: np.ndarray, tokenizer, n_tokens: int) -> float | None:
    """UTF-8 bytes per validation token: from the manifest's val_bytes, else by decoding what we evaluate."""
    if manifest.get("val_bytes"):
        return manifest["val_bytes"] / manifest["tokens"]["val"]
    if tokenizer is None:
        return None
    ids = val[:n_tokens].astype(np.int64).tolist()
    return len(tokenizer.decode(ids, skip_special_tokens=True).encode("utf-8")) / max(1, len(ids))


def make_evaluate(val: np.ndarray, cfg: TrainConfig, d: D.Dist, bpt: float | None):
    """Mean loss over a fixed head of the validation split (the same tokens every time), split across ranks."""
    rows = max(1, min(cfg.eval_batches * cfg.micro_batch, (len(val) - 1) // cfg.seq_len))
    rows -= rows % d.world if rows >= d.world else 0
    mine = range(d.rank, rows, d.world)

    def evaluate(model) -> dict:
        total, count = 0.0, 0
        for i in range(0, len(mine), cfg.micro_batch):
            idx = list(mine[i:i + cfg.micro_batch])
            chunk = np.stack([val[r * cfg.seq_len:r * cfg.seq_len + cfg.seq_len + 1] for r in idx])
            chunk = torch.from_numpy(chunk.astype(np.int64)).to(d.device)
            logits = model(chunk[:, :-1])
            total += F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), chunk[:, 1:].reshape(-1),
                                     reduction="sum").item()
            count += chunk[:, 1:].numel()
        total, count = D.sum_([total, float(count)], d)
        loss = total / count
        out = {"val_loss": loss}
        if bpt:
            out["val_bpb"] = loss / math.log(2) / bpt
        return out

    return evaluate, rows * cfg.seq_len


@torch.no_grad()
def generate(model: Transformer, prompt: torch.Tensor, max_new_tokens: int, temperature: float = 0.8,
             generator: torch.Generator | None = None, eos_id: int | None = None) -> list[list[int]]:
    """Temperature sampling with the KV cache (greedy at temperature 0); prompt (B, T) -> new ids per row."""
    B, T = prompt.shape
    max_new_tokens = min(max_new_tokens, model.config.max_seq_len - T)
    cache = model.new_cache(B, T + max_new_tokens, dtype=torch.float32)
    positions = torch.arange(T, device=prompt.device).expand(B, T)
    logits = model(prompt, input_pos=positions, kv_cache=cache, last_only=True)[:, -1]
    out = []
    for i in range(max_new_tokens):
        if temperature == 0:
            nxt = logits.argmax(-1)
        else:
            probs = torch.softmax(logits.float() / temperature, dim=-1)
            nxt = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        out.append(nxt)
        if i + 1 == max_new_tokens:
            break
        pos = torch.full((B, 1), T + i, device=prompt.device)
        logits = model(nxt[:, None], input_pos=pos, kv_cache=cache)[:, -1]
    ids = torch.stack(out, 1).tolist() if out else [[] for _ in range(B)]
    if eos_id is not None:
        ids = [row[:row.index(eos_id) + 1] if eos_id in row else row for row in ids]
    return ids


def make_sample(val: np.ndarray, tokenizer, cfg: TrainConfig, eos_id: int | None, prompt_len: int = 8):
    """Continue the first few tokens of validation windows; its own RNG, so training randomness is untouched."""
    n = max(1, min(cfg.num_samples, (len(val) - prompt_len) // cfg.seq_len))
    prompts = torch.from_numpy(np.stack([val[i * cfg.seq_len:i * cfg.seq_len + prompt_len]
                                         for i in range(n)]).astype(np.int64))

    def sample(model, step: int) -> list[str]:
        gen = torch.Generator().manual_seed(step)
        was_training = model.training
        model.eval()
        new = generate(model, prompts.to(model_device(model)), cfg.sample_tokens, generator=gen, eos_id=eos_id)
        model.train(was_training)
        return [tokenizer.decode(p.tolist() + ids, skip_special_tokens=False) for p, ids in zip(prompts, new)]

    return sample


class CopiedTokenizer:
    """What save_hf_dir needs of a tokenizer (save(dir)): copy the tokenizer directory's files in."""

    FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
             "vocab.json", "merges.txt", "tokenizer.model")

    def __init__(self, source: Path):
        self.source = source

    def save(self, directory):
        src = self.source if self.source.is_dir() else self.source.parent
        for name in self.FILES:
            if (src / name).is_file():
                shutil.copy2(src / name, Path(directory) / name)


def model_config(preset: str | None, vocab_size: int, seq_len: int, eos_id: int | None = None,
                 **overrides) -> ModelConfig:
    if preset is not None and preset not in PRESETS:
        raise LLMLabError(f"unknown preset {preset!r} (choose from {', '.join(PRESETS)})")
    fields = dict(PRESETS[preset or "tiny"])
    fields.update({k: v for k, v in overrides.items() if v is not None})
    return ModelConfig(vocab_size=vocab_size, max_seq_len=seq_len, eos_token_id=eos_id, **fields)


def pretrain(data_dir: str | Path, cfg: TrainConfig, model_cfg: ModelConfig | None = None,
             tokenizer_dir: str | Path | None = None, resume: bool = False, preset: str | None = None):
    """Pretrain from scratch on packed shards; writes checkpoints, metrics.jsonl, loss.png and the final model
    (a Hugging Face directory, cfg.out_dir/model). Returns the loop's Result and the final model path (None if
    interrupted)."""
    d = D.setup()
    try:
        manifest = load_manifest(data_dir)
        tokenizer = load_tokenizer(tokenizer_dir)
        expected_hash = None
        if tokenizer_dir is not None:
            from llmlab.data.pack import tokenizer_sha256
            expected_hash = tokenizer_sha256(tokenizer_dir)
        train_tokens = load_shards(data_dir, "train", expected_hash)
        val_tokens = load_shards(data_dir, "val", expected_hash)
        if model_cfg is None:
            model_cfg = model_config(preset, manifest["vocab_size"], cfg.seq_len, manifest.get("eos_id"))
        if model_cfg.vocab_size < manifest["vocab_size"]:
            raise LLMLabError(f"model vocab_size {model_cfg.vocab_size} < the data's {manifest['vocab_size']}")
        if cfg.seq_len > model_cfg.max_seq_len:
            raise LLMLabError(f"seq_len {cfg.seq_len} is longer than the model's max_seq_len {model_cfg.max_seq_len}")
        model = Transformer(model_cfg).init_weights(seed=cfg.seed)
        batches = TokenBatches(train_tokens, cfg.seq_len, cfg.micro_batch, cfg.grad_accum, d.rank, d.world)
        evaluate, n_eval = make_evaluate(val_tokens, cfg, d, None)
        bpt = bytes_per_token(manifest, val_tokens, tokenizer, n_eval)
        evaluate, _ = make_evaluate(val_tokens, cfg, d, bpt)
        sample = make_sample(val_tokens, tokenizer, cfg, manifest.get("eos_id")) if tokenizer else None
        objective = Objective(loss_fn=lm_loss, batches=batches, evaluate=evaluate, sample=sample)
        extra = {"tokenizer_sha256": manifest.get("tokenizer_sha256")}
        result = train(model, objective, cfg, resume=resume, extra_state=extra, dist=d)
        final = None
        if not result.interrupted and d.is_main:
            from llmlab.checkpoint.hf import save_hf_dir
            tok = CopiedTokenizer(Path(tokenizer_dir)) if tokenizer_dir is not None else None
            final = save_hf_dir(result.model, Path(cfg.out_dir) / "model", dtype="float32", tokenizer=tok)
        D.barrier(d)
        return result, final
    finally:
        D.teardown(d)
