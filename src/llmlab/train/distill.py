"""Distillation through the one training loop: a student learns a teacher's next-token distribution (token-level
forward KL at a temperature) or the teacher's own samples (sequence-level), e.g. a small draft model for
speculative decoding that shares the teacher's tokenizer.

Data is JSONL ({"messages": [...]}, {"prompt": ...} or {"text": ...} per line) or a plain text file (paragraphs).
Token-level: every token of every example teaches (KL to the teacher's distribution there). Sequence-level: the
teacher answers each example's prompt once (seeded, stored in OUT/teacher_samples.jsonl before training starts, so
a resumed run trains on the very same samples), and the student learns the answers (cross-entropy on their tokens).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from llmlab.errors import LLMLabError
from llmlab.io import atomic_write_text
from llmlab.model import ModelConfig, Transformer
from llmlab.train import distributed as D
from llmlab.train.chat_data import IGNORE, RowBatches, collate_rows, read_jsonl, render_conversation, to_rows
from llmlab.train.config import PRESETS, TrainConfig
from llmlab.train.loop import Objective, train
from llmlab.train.pretrain import model_device
from llmlab.train.sft import pad_id_of, sft_loss

MODES = ("kl", "seq")
VAL_SHARE = 0.05  # rows held out for evaluation (at least one)


# ---- data --------------------------------------------------------------------------------------------------------


def chat_prompt(tokenizer, messages: list[dict]) -> list[int]:
    """The prompt before a conversation's last assistant reply (or after its end), as the model sees it."""
    while messages and messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    if not messages:
        raise LLMLabError("a conversation needs a message before the assistant's reply")
    return tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True))


def load_examples(path: str | Path, tokenizer, prompts_only: bool = False) -> list[tuple[list[int], list[bool]]]:
    """[(ids, which tokens teach)] of a data file. prompts_only: just the prompts (mask all False), for the teacher
    to answer. A plain text file gives one example per paragraph (its first third as the prompt)."""
    path = Path(path)
    if not path.is_file():
        raise LLMLabError(f"no such file: {path}")
    if path.suffix != ".jsonl":
        paragraphs = [p.strip() for p in path.read_text(encoding="utf-8").split("\n\n") if p.strip()]
        records = [(i, {"text": p}) for i, p in enumerate(paragraphs, 1)]
    else:
        records = read_jsonl(path)[0]
    chat = bool(tokenizer.chat_template)
    out = []
    for lineno, record in records:
        where = f"{path}:{lineno}"
        if isinstance(record.get("messages"), list):
            if prompts_only:
                ids = chat_prompt(tokenizer, record["messages"])
            else:
                ids = render_conversation(tokenizer, record["messages"])[0]
        elif isinstance(record.get("prompt"), str):
            messages = [{"role": "user", "content": record["prompt"]}]
            ids = (chat_prompt(tokenizer, messages) if chat
                   else tokenizer.encode(record["prompt"], add_special_tokens=True))
            if not prompts_only and isinstance(record.get("completion"), str):
                ids = ids + tokenizer.encode(record["completion"])
        elif isinstance(record.get("text"), str):
            ids = tokenizer.encode(record["text"], add_special_tokens=True)
            if prompts_only:
                ids = ids[:max(1, len(ids) // 3)]
        else:
            raise LLMLabError(f"{where}: each line needs 'messages', 'prompt' or 'text'")
        if len(ids) >= 2 or prompts_only and ids:
            out.append((ids, [not prompts_only] * len(ids)))
    if not out:
        raise LLMLabError(f"{path}: no usable examples")
    return out


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def teacher_samples(teacher, tokenizer, prompts: list[list[int]], out_dir: Path, key: dict, max_new_tokens: int,
                    temperature: float, seed: int, batch: int = 8) -> list[tuple[list[int], list[bool]]]:
    """[(prompt + the teacher's answer, mask on the answer)], made once and stored in out_dir (reused when the
    same teacher, data and settings ask again: a resumed run trains on the same samples)."""
    from llmlab.engine import Engine, SamplingParams
    cache = out_dir / "teacher_samples.jsonl"
    if cache.is_file():
        lines = cache.read_text(encoding="utf-8").splitlines()
        if lines and json.loads(lines[0]) == key:
            return [(r["prompt"] + r["answer"], [False] * len(r["prompt"]) + [True] * len(r["answer"]))
                    for r in map(json.loads, lines[1:])]
    engine = Engine(teacher, tokenizer)
    params = SamplingParams(temperature=temperature, max_new_tokens=max_new_tokens, seed=seed)
    eos = teacher.config.eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos if eos is not None else tokenizer.eos_token_id
    records = []
    for i in range(0, len(prompts), batch):
        chunk = [p[:teacher.config.max_seq_len - max_new_tokens - 1] for p in prompts[i:i + batch]]
        for prompt, done in zip(chunk, engine.generate(chunk, params)):
            # an answer that ended by itself ends with the end of turn, so the student learns where answers end
            ended = done.finish_reason == "stop" and done.completion_tokens > len(done.token_ids) and eos is not None
            records.append({"prompt": prompt, "answer": done.token_ids + ([eos] if ended else [])})
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(cache, "".join(json.dumps(r) + "\n" for r in [key, *records]))
    return [(r["prompt"] + r["answer"], [False] * len(r["prompt"]) + [True] * len(r["answer"])) for r in records]


# ---- the losses --------------------------------------------------------------------------------------------------


def kl_terms(student_logits, teacher_logits, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per position: forward KL(teacher || student) of the temperature-softened distributions, scaled by T² (so
    gradients keep their size across temperatures, Hinton et al. 2015); and whether the two argmaxes agree."""
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1) * temperature ** 2
    return kl, (student_logits.argmax(-1) == teacher_logits.argmax(-1)).float()


def kl_loss_fn(teacher, temperature: float):
    def loss_fn(model, batch):
        x, y = batch
        device = model_device(model)
        x, y = x.to(device), y.to(device)
        keep = y != IGNORE
        student = model(x)[keep]
        with torch.no_grad():
            target = teacher(x)[keep]
        kl, agree = kl_terms(student, target, temperature)
        return kl.mean(), {"agreement": float(agree.mean())}

    return loss_fn


def make_eval(rows: list, teacher, cfg: TrainConfig, temperature: float):
    """Held-out mean KL to the teacher (at temperature 1) and top-1 agreement: the share of positions where the
    student's greedy token is the teacher's (a greedy draft's acceptance rate, token by token)."""
    rows = rows[:max(1, cfg.eval_batches * cfg.micro_batch)]

    @torch.no_grad()
    def evaluate(model) -> dict:
        kl_sum, agree_sum, count = 0.0, 0.0, 0
        for i in range(0, len(rows), cfg.micro_batch):
            x, y = collate_rows(rows[i:i + cfg.micro_batch])
            x, y = x.to(model_device(model)), y.to(model_device(model))
            keep = y != IGNORE
            kl, agree = kl_terms(model(x)[keep], teacher(x)[keep], 1.0)
            kl_sum, agree_sum, count = kl_sum + float(kl.sum()), agree_sum + float(agree.sum()), count + int(keep.sum())
        return {"val_kl": kl_sum / max(1, count), "val_agreement": agree_sum / max(1, count)}

    return evaluate


# ---- the student -------------------------------------------------------------------------------------------------


def make_student(teacher, student_config: str | None, student: str | None, seed: int) -> Transformer:
    """A fresh student from a preset name or config.json (the teacher's vocabulary, context and special tokens), or
    a checkpoint to start from; its vocabulary must be the teacher's."""
    if (student_config is None) == (student is None):
        raise LLMLabError("give exactly one of --student-config (a preset or config.json) and --student (a checkpoint)")
    t = teacher.config
    if student is not None:
        from llmlab.checkpoint.load import load_checkpoint
        model = load_checkpoint(student)[0].float()
    elif student_config in PRESETS:
        cfg = ModelConfig(vocab_size=t.vocab_size, max_seq_len=t.max_seq_len, rope_theta=t.rope_theta,
                          tie_embeddings=True, bos_token_id=t.bos_token_id, eos_token_id=t.eos_token_id,
                          pad_token_id=t.pad_token_id, **PRESETS[student_config])
        model = Transformer(cfg).init_weights(seed=seed)
    elif Path(student_config).is_file():
        model = Transformer(ModelConfig.load(student_config)).init_weights(seed=seed)
    else:
        raise LLMLabError(f"--student-config {student_config!r} is neither a preset ({', '.join(PRESETS)}) nor a "
                          "config.json file")
    if model.config.vocab_size != t.vocab_size:
        raise LLMLabError(f"the student has {model.config.vocab_size} tokens in its vocabulary, the teacher "
                          f"{t.vocab_size}: distillation needs the same tokenizer")
    return model


def distill(teacher_path: str | Path, data: str | Path, cfg: TrainConfig, student_config: str | None = None,
            student: str | None = None, mode: str = "kl", temperature: float = 1.0, sample_tokens: int = 128,
            sample_temperature: float = 0.7, resume: bool = False) -> dict:
    """Train a student on a teacher; writes cfg.out_dir/model (HF layout, the teacher's tokenizer). Returns a summary:
    path, steps, interrupted, the first and last held-out KL and agreement, parameters, seconds, model."""
    if mode not in MODES:
        raise LLMLabError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    if temperature <= 0:
        raise LLMLabError(f"temperature must be > 0, got {temperature}")
    from llmlab.checkpoint.load import load_checkpoint
    d = D.setup()
    try:
        teacher, tokenizer, tpath = load_checkpoint(teacher_path)
        teacher = teacher.float().eval().requires_grad_(False).to(d.device)
        model = make_student(teacher, student_config, student, cfg.seed)
        if cfg.seq_len > min(model.config.max_seq_len, teacher.config.max_seq_len):
            raise LLMLabError(f"seq_len {cfg.seq_len} is longer than the student's or teacher's context")
        key = {"teacher": str(tpath), "data_sha256": file_sha256(data), "mode": mode, "temperature": temperature}
        if mode == "seq":
            prompts = [ids for ids, _ in load_examples(data, tokenizer, prompts_only=True)]
            key |= {"sample_tokens": sample_tokens, "sample_temperature": sample_temperature}
            examples = teacher_samples(teacher, tokenizer, prompts, Path(cfg.out_dir), {**key, "seed": cfg.seed},
                                       sample_tokens, sample_temperature, cfg.seed)
        else:
            examples = load_examples(data, tokenizer)
        rows = to_rows(examples, cfg.seq_len, True, pad_id_of(tokenizer))
        n_val = max(1, int(len(rows) * VAL_SHARE)) if len(rows) > 1 else 0
        train_rows, val_rows = rows[:len(rows) - n_val], rows[len(rows) - n_val:] or rows
        evaluate = make_eval(val_rows, teacher, cfg, temperature)
        before = evaluate(model.to(d.device).eval())
        model.train()
        batches = RowBatches(train_rows, cfg.micro_batch, cfg.grad_accum, cfg.seed, d.rank, d.world)
        loss_fn = kl_loss_fn(teacher, temperature) if mode == "kl" else sft_loss
        objective = Objective(loss_fn=loss_fn, batches=batches, evaluate=evaluate)
        t0 = time.perf_counter()
        result = train(model, objective, cfg, resume=resume, extra_state={"distill": key}, dist=d)
        seconds = time.perf_counter() - t0
        after = evaluate(result.model.eval())
        out = None
        if not result.interrupted and d.is_main:
            from llmlab.checkpoint.hf import save_hf_dir
            out = save_hf_dir(result.model, Path(cfg.out_dir) / "model", dtype="float32", tokenizer=tokenizer)
        D.barrier(d)
        return {"path": out, "steps": result.step, "interrupted": result.interrupted, "before": before,
                "after": after, "student_params": result.model.num_params(), "rows": len(train_rows),
                "seconds": seconds, "model": result.model, "tokenizer": tokenizer, "teacher": teacher}
    finally:
        D.teardown(d)


def draft_acceptance(teacher, tokenizer, student, prompts: list[list[int]], max_new_tokens: int = 64,
                     draft_tokens: int = 4) -> dict:
    """The student as a draft for the teacher: greedy speculative decoding of the prompts (drafting never turned
    off), and the share of drafted tokens the teacher kept."""
    from llmlab.engine import Engine, SamplingParams
    from llmlab.engine.draft import ModelDrafter
    from llmlab.engine.speculative import SpeculativeDecoder
    decoder = SpeculativeDecoder(Engine(teacher.eval(), tokenizer), ModelDrafter(student.eval()), draft_tokens,
                                 min_acceptance=0.0, auto_off=False)
    for prompt in prompts:
        decoder.generate(prompt, SamplingParams(temperature=0, max_new_tokens=max_new_tokens))
    return {"acceptance_rate": decoder.stats.acceptance_rate, "tokens_per_step": decoder.stats.tokens_per_step,
            "drafted": decoder.stats.drafted}


# ---- a draft that knows only the frequent tokens -----------------------------------------------------------------


def frequent_tokens(examples: list[tuple[list[int], list[bool]]], n: int, always: list[int] = ()) -> list[int]:
    """The n most frequent token ids of the examples (`always` first, e.g. the end-of-turn token), most frequent
    first: the vocabulary of a draft whose output head costs n / V of the full one's."""
    counts: dict[int, int] = {}
    for ids, _ in examples:
        for token in ids:
            counts[token] = counts.get(token, 0) + 1
    picked = [t for t in dict.fromkeys(always) if t is not None]
    taken = set(picked)
    picked += [t for t in sorted(counts, key=lambda t: (-counts[t], t)) if t not in taken]
    return picked[:n]


def shrink_vocab(model: Transformer, token_ids: list[int]) -> Transformer:
    """A copy of the model that knows only token_ids (its rows 0..n-1, in that order) and one more row for every other
    token (input: the mean of their embeddings; output: never drafted): its logits are the full model's at those
    ids, so as a greedy draft it proposes what the full one would whenever that is one of them (llmlab.engine.draft
    reads the list from DRAFT_VOCAB). The output head, 8 bits x V x dim per token, is most of a small draft's step."""
    import dataclasses
    ids = torch.tensor(token_ids, dtype=torch.long)
    others = torch.ones(model.config.vocab_size, dtype=torch.bool)
    others[ids] = False
    small = Transformer(dataclasses.replace(model.config, vocab_size=len(token_ids) + 1))
    state = {k: v for k, v in model.state_dict().items() if "embed_tokens" not in k and "lm_head" not in k}
    embed = model.model.embed_tokens.weight.detach().float()
    state["model.embed_tokens.weight"] = torch.cat([embed[ids], embed[others].mean(0, keepdim=True)])
    if not model.config.tie_embeddings:
        head = model.lm_head.weight.detach().float()
        state["lm_head.weight"] = torch.cat([head[ids], torch.zeros_like(head[:1])])
    small.load_state_dict(state, strict=False)  # (buffers such as RoPE tables are the new model's own)
    return small


def save_draft(model: Transformer, token_ids: list[int], path: str | Path, tokenizer) -> Path:
    """shrink_vocab(model, token_ids) as a checkpoint for --speculate draft:PATH (HF layout plus DRAFT_VOCAB; its
    config.json's vocab_size is the draft's own, so it is a draft, not a model to chat with)."""
    from llmlab.checkpoint.hf import save_hf_dir
    from llmlab.engine.draft import DRAFT_VOCAB
    path = save_hf_dir(shrink_vocab(model, token_ids), path, dtype="float32", tokenizer=tokenizer)
    atomic_write_text(path / DRAFT_VOCAB, json.dumps({"token_ids": [int(t) for t in token_ids]}))
    return path
