"""Chat and preference data for post-training: JSONL reading, chat-template rendering, assistant-only loss masks,
packing, and the resumable batch sources the training loop consumes.

A conversation is {"messages": [{"role": ..., "content": ...}, ...]} (the Hugging Face / OpenAI convention).
It is rendered with the checkpoint's own chat template, turn by turn: the text before each assistant reply is
exactly the prompt the model sees at inference (template with add_generation_prompt=True), and the reply's
tokens, up to and including the end-of-turn token, are the only ones that carry loss.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from llmlab.errors import LLMLabError

IGNORE = -100  # cross_entropy's ignore_index: positions that carry no loss


# ---- reading JSONL ---------------------------------------------------------------------------------------


def read_jsonl(path: str | Path, skip_bad: bool = False) -> tuple[list[dict], int]:
    """(records, number of skipped lines). A bad line is an error naming its line number, unless skip_bad."""
    path = Path(path)
    if not path.is_file():
        raise LLMLabError(f"no such file: {path}")
    records, bad = [], 0
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise ValueError("not a JSON object")
            except ValueError as e:
                if skip_bad:
                    bad += 1
                    continue
                raise LLMLabError(f"{path}:{lineno}: malformed JSON line ({e}); fix it or pass --skip-bad") from None
            records.append((lineno, record))
    return records, bad


def check_messages(messages, where: str, need_assistant: bool = True) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise LLMLabError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise LLMLabError(f"{where}: every message needs a string 'role' and a string 'content'")
    if need_assistant and not any(m["role"] == "assistant" for m in messages):
        raise LLMLabError(f"{where}: the conversation has no assistant turn, so nothing to learn from")
    return messages


# ---- rendering with the chat template ------------------------------------------------------------------


def render_conversation(tokenizer, messages: list[dict]) -> tuple[list[int], list[bool]]:
    """Token ids of the whole conversation and, per token, whether it is assistant output (carries loss).

    Text segments are encoded one by one: before each assistant turn, the template's generation prompt;
    then the turn itself. So the prompt tokens are exactly what inference feeds the model.
    """
    ids, mask = [], []
    done = ""  # the text rendered so far
    stops = tokenizer.stop_token_ids
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True) if i else ""
        full = tokenizer.apply_chat_template(messages[:i + 1], add_generation_prompt=False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise LLMLabError("the chat template does not render conversations incrementally; cannot mask "
                              "assistant turns")
        before = tokenizer.encode(prompt[len(done):]) if len(prompt) > len(done) else []
        reply = tokenizer.encode(full[len(prompt):])
        # learn the reply up to and including its end-of-turn token; what follows (a newline) is template glue
        last_stop = max((j for j, t in enumerate(reply) if t in stops), default=len(reply) - 1)
        ids += before + reply
        mask += [False] * len(before) + [j <= last_stop for j in range(len(reply))]
        done = full
    rest = tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    if len(rest) > len(done):  # turns after the last assistant reply: context only
        tail = tokenizer.encode(rest[len(done):])
        ids += tail
        mask += [False] * len(tail)
    if tokenizer.add_bos and tokenizer.bos_token_id is not None and (not ids or ids[0] != tokenizer.bos_token_id):
        ids, mask = [tokenizer.bos_token_id] + ids, [False] + mask
    return ids, mask


def render_prompt(tokenizer, messages: list[dict]) -> list[int]:
    """The prompt ids for generating the next assistant turn (exactly what render_conversation uses)."""
    ids = tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
    if tokenizer.add_bos and tokenizer.bos_token_id is not None and (not ids or ids[0] != tokenizer.bos_token_id):
        ids = [tokenizer.bos_token_id] + ids
    return ids


def render_reply(tokenizer, messages: list[dict], reply: str) -> list[int]:
    """Token ids of an assistant reply after `messages`, ending with its end-of-turn token."""
    ids, mask = render_conversation(tokenizer, messages + [{"role": "assistant", "content": reply}])
    out = [t for t, m in zip(ids, mask) if m]
    return out


def check_tokenizer(tokenizer, model, where: str = "tokenizer"):
    """A tokenizer that does not belong to the checkpoint gives ids past the embedding table, or no template."""
    if tokenizer.vocab_size > model.config.vocab_size:
        raise LLMLabError(f"{where} has {tokenizer.vocab_size} tokens but the model only {model.config.vocab_size}; "
                          "they do not belong together")
    if not tokenizer.chat_template:
        raise LLMLabError(f"{where} has no chat template; chat finetuning needs one")
    eos = model.config.eos_token_id
    eos = eos if isinstance(eos, list) else [eos]
    if eos[0] is not None and not any(e in tokenizer.stop_token_ids for e in eos):
        raise LLMLabError(f"{where}: none of its stop tokens is the model's eos token {eos}; "
                          "the tokenizer does not match the checkpoint")


# ---- SFT examples ----------------------------------------------------------------------------------------


def load_conversations(path: str | Path, tokenizer, skip_bad: bool = False) -> tuple[list[tuple], int]:
    """[(ids, mask)] for every conversation in a JSONL file, and how many bad lines were skipped."""
    records, bad = read_jsonl(path, skip_bad)
    out = []
    for lineno, record in records:
        where = f"{path}:{lineno}"
        try:
            messages = check_messages(record.get("messages"), where)
            out.append(render_conversation(tokenizer, messages))
        except LLMLabError:
            if not skip_bad:
                raise
            bad += 1
    if not out:
        raise LLMLabError(f"{path}: no usable conversations")
    return out, bad


def conversations_to_examples(conversations: list[list[dict]], tokenizer) -> list[tuple]:
    return [render_conversation(tokenizer, check_messages(m, f"conversation {i}")) for i, m in enumerate(conversations)]


def to_rows(examples: list[tuple], seq_len: int, pack: bool, pad_id: int) -> list[tuple[list[int], list[int]]]:
    """Rows of (input ids, target ids) of length seq_len; targets are IGNORE where there is no loss.

    Packing concatenates short conversations into one row (first fit, in order), so no compute is spent on
    padding. Rows keep plain positions and causal attention across the packed conversations (as TRL's
    packing does); each conversation starts with its own template header, so the model learns the boundary.
    A conversation longer than a row is cut.
    """
    rows, cur_ids, cur_tgt = [], [], []

    def targets(ids, mask):
        # target at t is the token at t + 1, if that token carries loss
        return [ids[t + 1] if mask[t + 1] else IGNORE for t in range(len(ids) - 1)] + [IGNORE]

    def flush():
        nonlocal cur_ids, cur_tgt
        if cur_ids and any(t != IGNORE for t in cur_tgt):
            n = seq_len - len(cur_ids)
            rows.append((cur_ids + [pad_id] * n, cur_tgt + [IGNORE] * n))
        cur_ids, cur_tgt = [], []

    for ids, mask in examples:
        ids, mask = ids[:seq_len], mask[:seq_len]
        tgt = targets(ids, mask)
        if not pack or len(cur_ids) + len(ids) > seq_len:
            flush()
        cur_ids, cur_tgt = cur_ids + ids, cur_tgt + tgt
    flush()
    if not rows:
        raise LLMLabError("no row has an assistant token to learn from (are the conversations longer than seq_len?)")
    return rows


class RowBatches:
    """Micro-batches of rows, shuffled each epoch with a seeded RNG; resumable (epoch, position, micro).

    Like the pretraining batches, one optimizer step takes micro_batch * grad_accum * world rows and rank r's
    micro-batch m is rows (m * world + r) * micro_batch onwards.
    """

    def __init__(self, rows: list, micro_batch: int, grad_accum: int = 1, seed: int = 0, rank: int = 0,
                 world: int = 1, collate=None):
        self.rows, self.micro_batch, self.grad_accum = rows, micro_batch, grad_accum
        self.seed, self.rank, self.world = seed, rank, world
        self.collate = collate or collate_rows
        self.rows_per_step = micro_batch * grad_accum * world
        self.epoch, self.position, self.micro = 0, 0, 0
        self._order()

    def _order(self):
        self.order = list(range(len(self.rows)))
        random.Random(f"{self.seed}/{self.epoch}").shuffle(self.order)

    def __iter__(self):
        return self

    def __next__(self):
        first = self.position + (self.micro * self.world + self.rank) * self.micro_batch
        picked = [self.rows[self.order[(first + i) % len(self.order)]] for i in range(self.micro_batch)]
        self.micro += 1
        if self.micro == self.grad_accum:
            self.micro = 0
            self.position += self.rows_per_step
            if self.position >= len(self.rows):
                self.position, self.epoch = 0, self.epoch + 1
                self._order()
        return self.collate(picked)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "micro": self.micro}

    def load_state_dict(self, state: dict):
        self.epoch, self.position, self.micro = state["epoch"], state["position"], state["micro"]
        self._order()


def collate_rows(rows):
    x = torch.tensor([r[0] for r in rows], dtype=torch.long)
    y = torch.tensor([r[1] for r in rows], dtype=torch.long)
    return x, y


# ---- preference pairs ------------------------------------------------------------------------------------


@dataclass
class Pair:
    prompt: list[int]  # the rendered prompt (ends with the generation prompt)
    chosen: list[int]  # reply tokens, ending with the end-of-turn token
    rejected: list[int]


def _reply_text(value, where: str, key: str) -> str:
    """"chosen"/"rejected" may be a string, an assistant message, or a list ending with one."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    if isinstance(value, list) and value and isinstance(value[-1], dict) and isinstance(value[-1].get("content"), str):
        return value[-1]["content"]
    raise LLMLabError(f"{where}: '{key}' must be a string or an assistant message")


def preference_pair(record: dict, tokenizer, where: str = "pair") -> Pair:
    if "messages" in record:
        messages = check_messages(record["messages"], where, need_assistant=False)
    elif isinstance(record.get("prompt"), str):
        messages = [{"role": "user", "content": record["prompt"]}]
    elif isinstance(record.get("prompt"), list):
        messages = check_messages(record["prompt"], where, need_assistant=False)
    else:
        raise LLMLabError(f"{where}: a preference pair needs 'prompt' or 'messages'")
    for key in ("chosen", "rejected"):
        if key not in record:
            raise LLMLabError(f"{where}: missing '{key}'")
    chosen, rejected = _reply_text(record["chosen"], where, "chosen"), _reply_text(record["rejected"], where, "rejected")
    if chosen == rejected:
        raise LLMLabError(f"{where}: 'chosen' and 'rejected' are the same reply; the pair says nothing")
    return Pair(render_prompt(tokenizer, messages), render_reply(tokenizer, messages, chosen),
                render_reply(tokenizer, messages, rejected))


def load_pairs(path: str | Path, tokenizer, skip_bad: bool = False) -> tuple[list[Pair], int]:
    records, bad = read_jsonl(path, skip_bad)
    out = []
    for lineno, record in records:
        try:
            out.append(preference_pair(record, tokenizer, f"{path}:{lineno}"))
        except LLMLabError:
            if not skip_bad:
                raise
            bad += 1
    if not out:
        raise LLMLabError(f"{path}: no usable preference pairs")
    return out, bad


def pair_rows(pairs: list[Pair], seq_len: int) -> list[tuple]:
    """Each pair as (chosen ids, rejected ids, chosen reply length, rejected reply length), cut to seq_len
    by dropping the start of the prompt (the reply is what is compared)."""
    rows = []
    for p in pairs:
        c, r = p.prompt + p.chosen, p.prompt + p.rejected
        rows.append((c[-seq_len:], r[-seq_len:], min(len(p.chosen), seq_len - 1), min(len(p.rejected), seq_len - 1)))
    return rows


def collate_pairs(rows, pad_id: int = 0):
    """(ids (2B, T): chosen rows then rejected rows, right-padded; reply mask (2B, T) over the targets; lengths)."""
    seqs = [r[0] for r in rows] + [r[1] for r in rows]
    reply = [r[2] for r in rows] + [r[3] for r in rows]
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.bool)  # mask[b, t]: token t is a reply token
    lengths = torch.tensor([len(s) for s in seqs])
    for b, (s, n) in enumerate(zip(seqs, reply)):
        ids[b, :len(s)] = torch.tensor(s)
        mask[b, len(s) - n:len(s)] = True
    extra = [r[4:] for r in rows]  # e.g. precomputed reference log-probabilities
    return ids, mask, lengths, extra
