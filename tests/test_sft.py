"""Chat data (assistant-only masks, packing, bad input) and SFT: learning, exact resume, the CLI's errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llmlab.errors import LLMLabError
from llmlab.train.chat_data import IGNORE, load_conversations, render_conversation, to_rows
from llmlab.train.config import TrainConfig
from llmlab.cli.post_train import main as post_cli
from helpers import make_tiny_chat_checkpoint, sft_args, write_jsonl


CONVO = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"},
         {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3 + 3?"},
         {"role": "assistant", "content": "It is 6."}]


def masked_text(tokenizer, ids, mask, join="|"):
    """Decode each maximal run of loss-carrying tokens."""
    runs, cur = [], []
    for t, m in zip(ids, mask):
        if m:
            cur.append(t)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return join.join(tokenizer.decode(r) for r in runs)


def test_mask_covers_exactly_the_assistant_replies(tiny_tok):
    ids, mask = render_conversation(tiny_tok, CONVO)
    assert masked_text(tiny_tok, ids, mask) == "4<|im_end|>|It is 6.<|im_end|>"
    # the whole sequence decodes to the template's rendering: nothing dropped or added
    assert tiny_tok.decode(ids) == tiny_tok.apply_chat_template(CONVO, add_generation_prompt=False)


def test_mask_with_the_smollm2_template(smollm2_gguf):
    from llmlab.checkpoint.gguf import tokenizer_from_gguf
    tok = tokenizer_from_gguf(smollm2_gguf)
    ids, mask = render_conversation(tok, CONVO)
    assert masked_text(tok, ids, mask) == "4<|im_end|>|It is 6.<|im_end|>"
    assert tok.decode(ids) == tok.apply_chat_template(CONVO, add_generation_prompt=False)
    # the prompt tokens before the first reply are exactly what inference feeds the model
    prompt = tok.encode(tok.apply_chat_template(CONVO[:2], add_generation_prompt=True))
    assert ids[:len(prompt)] == prompt and not any(mask[:len(prompt)])


def test_packing_puts_several_conversations_in_a_row(tiny_tok):
    from llmlab.train import tasks
    examples = [render_conversation(tiny_tok, r["messages"])
                for r in tasks.sft_conversations(tasks.make_tasks("arithmetic", 20, seed=1))]
    packed = to_rows(examples, 128, pack=True, pad_id=0)
    unpacked = to_rows(examples, 128, pack=False, pad_id=0)
    assert len(unpacked) == 20 and len(packed) < 10
    # the targets carry the same assistant tokens either way, and each is the next input token
    count = lambda rows: sum(t != IGNORE for _, y in rows for t in y)
    assert count(packed) == count(unpacked) == sum(sum(m[1:]) for _, m in examples)
    for x, y in packed:
        for t in range(len(y) - 1):
            assert y[t] == IGNORE or y[t] == x[t + 1]


def test_bad_jsonl_reports_the_line_and_skip_bad_counts(tmp_path, tiny_tok):
    good = {"messages": CONVO}
    path = write_jsonl(tmp_path / "d.jsonl", [good, good], raw_lines=['{"messages": [', json.dumps(good)])
    with pytest.raises(LLMLabError, match=r"d.jsonl:3: malformed JSON"):
        load_conversations(path, tiny_tok)
    examples, bad = load_conversations(path, tiny_tok, skip_bad=True)
    assert (len(examples), bad) == (3, 1)
    path = write_jsonl(tmp_path / "n.jsonl", [good, {"messages": CONVO[:2]}])
    with pytest.raises(LLMLabError, match=r"n.jsonl:2: .*no assistant turn"):
        load_conversations(path, tiny_tok)


def test_cli_bad_input_is_one_line_and_nonzero(tmp_path, tiny_ckpt, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", [{"messages": CONVO}], raw_lines=["not json"])
    assert post_cli(sft_args(tiny_ckpt, data, tmp_path / "o", "--max-steps", "1")) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "d.jsonl:2" in err
    # a tokenizer from another model (a larger vocabulary) is refused
    other = make_tiny_chat_checkpoint(tmp_path / "other", vocab=600)
    assert post_cli(sft_args(tiny_ckpt, data, tmp_path / "o", "--tokenizer", str(other), "--skip-bad")) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "do not belong together" in err


def final_weights(out: Path) -> dict:
    from llmlab.checkpoint.hf import load_hf_dir
    return load_hf_dir(out / "model").state_dict()


def test_sft_learns_and_resumes_exactly(tmp_path, tiny_ckpt):
    from llmlab.train import tasks
    from llmlab.train.metrics import read_metrics
    data = write_jsonl(tmp_path / "d.jsonl", tasks.sft_conversations(tasks.make_tasks("arithmetic", 64, seed=0)))
    exact = ["--deterministic", "--save-every", "3"]
    assert post_cli(sft_args(tiny_ckpt, data, tmp_path / "a", "--max-steps", "30", *exact)) == 0
    losses = [r["loss"] for r in read_metrics(tmp_path / "a" / "metrics.jsonl") if "loss" in r]
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:3]) / 3
    # 6 steps straight == 3 steps, then resume to 6
    assert post_cli(sft_args(tiny_ckpt, data, tmp_path / "b", "--max-steps", "6", *exact)) == 0
    assert post_cli(sft_args(tiny_ckpt, data, tmp_path / "c", "--max-steps", "3", *exact)) == 0
    assert post_cli(sft_args(tiny_ckpt, data, tmp_path / "c", "--max-steps", "6", "--resume", *exact)) == 0
    b, c = final_weights(tmp_path / "b"), final_weights(tmp_path / "c")
    assert all(torch.equal(b[k], c[k]) for k in b)


def test_sft_loss_on_loss_positions_only_equals_the_full_forward(tiny_ckpt, tiny_tok):
    from llmlab.checkpoint.hf import load_hf_dir
    from llmlab.train import tasks
    from llmlab.train.chat_data import collate_rows
    from llmlab.train.sft import sft_loss
    model = load_hf_dir(tiny_ckpt)
    examples = [render_conversation(tiny_tok, r["messages"])
                for r in tasks.sft_conversations(tasks.make_tasks("all", 8, seed=3))]
    x, y = collate_rows(to_rows(examples, 64, pack=True, pad_id=0))
    full = torch.nn.functional.cross_entropy(model(x).view(-1, model.config.vocab_size), y.view(-1),
                                             ignore_index=IGNORE)
    assert torch.allclose(sft_loss(model, (x, y))[0], full, atol=1e-5)


def test_knowledge_experiment_runs_at_tiny_size(tmp_path):
    import knowledge_extraction
    from llmlab.data.bios import ATTRIBUTES
    knowledge_extraction.run(people=4, pretrain_steps=2, sft_steps=2, dim=32, layers=1, out=tmp_path)
    rows = json.loads((tmp_path / "knowledge_extraction.json").read_text())["rows"]
    assert [r["condition"] for r in rows] == list(knowledge_extraction.CONDITIONS)
    for r in rows:
        assert all(0 <= r[k] <= 1 for k in ("storage_train_people", "storage_heldout_people",
                                            "qa_exact_match_train_people", "qa_exact_match_heldout_people"))
    assert "storage_heldout_after_sft" in rows[0] and "storage_heldout_after_sft" not in rows[2]  # mixed: no SFT
    per_attribute = json.loads((tmp_path / "knowledge_extraction_per_attribute.json").read_text())["rows"]
    assert all(f"qa_heldout/{a}" in r and f"storage_heldout/{a}" in r for r in per_attribute for a in ATTRIBUTES)
    assert (tmp_path / "knowledge_extraction.png").is_file()


def test_knowledge_storage_targets_are_the_attribute_values(tmp_path):
    """Storage is scored on the tokens of each attribute's value inside a biography, for every augmentation."""
    import knowledge_extraction as ke
    from llmlab.data.bios import ATTRIBUTES, QA_CHAT_TEMPLATE, make_bios_world
    from llmlab.tokenizer import Tokenizer
    from llmlab.train.chat_data import render_prompt
    from llmlab.tokenizer.train import train_bpe
    world = make_bios_world(12, seed=3)
    tokenizer = Tokenizer.from_dir(train_bpe(list(world.biographies(ke.AUGMENTED)), 400, tmp_path / "tok"))
    for augment, copies in ((None, 1), (ke.AUGMENTED, 5)):
        for i, bio in enumerate(world.biographies(augment)):
            person = world.people[i // copies]
            ids, spans = ke.storage_targets(bio, person, tokenizer)
            assert ids[0] == tokenizer.eos_token_id and ids[1:] == tokenizer.encode(bio)
            assert {a: tokenizer.decode(ids[s:e]) for a, (s, e) in spans.items()} == \
                {a: " " + getattr(person, a) for a in ATTRIBUTES}
    # plain-text QA: the SFT target is the answer and the end-of-text token, the prompt is what evaluation feeds
    tokenizer.chat_template = QA_CHAT_TEMPLATE
    conv = [{"role": "user", "content": "Where did Ann Lee work?"}, {"role": "assistant", "content": "Dover, DE"}]
    ids, mask = render_conversation(tokenizer, conv)
    assert tokenizer.decode([t for t, m in zip(ids, mask) if m]) == " Dover, DE<|endoftext|>"
    assert ids[:mask.index(True)] == render_prompt(tokenizer, conv[:1])
