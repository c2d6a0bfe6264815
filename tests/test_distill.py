"""Distillation (`llmlab distill`): token-level KL to a tiny teacher falls and the student's greedy tokens move toward
the teacher's; sequence-level training on the teacher's stored samples; resume refuses another setting and continues
the same one; the distilled student drafts for its teacher (greedy output unchanged)."""

import json

import pytest
import torch

from helpers import assert_greedy_up_to_ties, decode_logits, write_jsonl
from llmlab.errors import LLMLabError
from llmlab.train import tasks
from llmlab.train.config import TrainConfig


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory):
    records = tasks.sft_conversations(tasks.make_tasks("all", 96, seed=5))
    return write_jsonl(tmp_path_factory.mktemp("distill") / "chats.jsonl", records)


@pytest.fixture(scope="module")
def teacher(tiny_ckpt, tmp_path_factory):
    """The tiny chat checkpoint with a scaled output layer: its next-token distributions are far from uniform, as a
    trained model's are, so there is something to learn (a random model's are near uniform: KL ~0.03 from anything)."""
    from llmlab.checkpoint.hf import save_hf_dir
    from llmlab.checkpoint.load import load_checkpoint
    model, tokenizer, _ = load_checkpoint(tiny_ckpt)
    with torch.no_grad():
        model.lm_head.weight.mul_(12)
    return save_hf_dir(model, tmp_path_factory.mktemp("teacher") / "model", tokenizer=tokenizer)


def fast_config(out, steps, **extra) -> TrainConfig:
    settings = dict(out_dir=str(out), max_steps=steps, seq_len=64, micro_batch=4, lr=3e-3, min_lr=3e-4,
                    warmup_steps=3, weight_decay=0.0, dtype="float32", eval_every=0, save_every=10,
                    progress=False, threads=1, peak_flops=1e12)
    return TrainConfig(**{**settings, **extra})


def test_token_level_kl_falls_and_the_student_moves_toward_the_teacher(teacher, chat_data, tmp_path):
    from llmlab.train.distill import distill
    summary = distill(teacher, chat_data, fast_config(tmp_path / "kl", 30), student_config="tiny", mode="kl")
    before, after = summary["before"], summary["after"]
    assert summary["steps"] == 30 and not summary["interrupted"]
    assert after["val_kl"] < 0.5 * before["val_kl"], (before, after)  # held-out rows, never trained on
    assert after["val_agreement"] > before["val_agreement"] + 0.15, (before, after)
    metrics = [json.loads(line) for line in (tmp_path / "kl" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["loss"] < metrics[0]["loss"] and "agreement" in metrics[-1]
    # the student is an HF checkpoint with the teacher's tokenizer, and drafts for it: greedy output unchanged
    import llmlab
    from llmlab.engine import SamplingParams
    from llmlab.engine.speculative import SpeculativeDecoder
    big, student = llmlab.load(teacher), llmlab.load(summary["path"])
    assert student.tokenizer.encode("a + b = 12") == big.tokenizer.encode("a + b = 12")
    decoder = SpeculativeDecoder(big.engine, f"draft:{summary['path']}", draft_tokens=4, auto_off=False)
    ids = big.prompt_ids("What is 3 + 4?")
    params = SamplingParams(temperature=0, max_new_tokens=16, ignore_eos=True)
    spec, plain = decoder.generate(ids, params), big.engine.generate([ids], params)[0]
    if spec.token_ids != plain.token_ids:  # a k + 1 token verify rounds differently from one-token steps (~1e-6)
        assert_greedy_up_to_ties(decode_logits(big.model, ids, spec.token_ids), spec.token_ids, margin=1e-4)
    assert decoder.stats.accepted > 0  # a distilled draft gets some of the teacher's tokens right


def test_sequence_level_trains_on_stored_teacher_samples_and_resumes(teacher, chat_data, tmp_path):
    from llmlab.train.distill import distill
    out = tmp_path / "seq"
    config = lambda steps: fast_config(out, steps, save_every=4)  # noqa: E731
    first = distill(teacher, chat_data, config(4), student_config="tiny", mode="seq", sample_tokens=12)
    samples = (out / "teacher_samples.jsonl").read_text()
    header = json.loads(samples.splitlines()[0])
    assert header["mode"] == "seq" and len(samples.splitlines()) == 1 + 96
    assert all(1 <= len(json.loads(line)["answer"]) <= 13 for line in samples.splitlines()[1:])
    with pytest.raises(LLMLabError, match="cannot resume"):  # the same directory, another objective
        distill(teacher, chat_data, config(8), student_config="tiny", mode="kl", resume=True)
    with pytest.raises(LLMLabError, match="already holds a training run"):
        distill(teacher, chat_data, config(8), student_config="tiny", mode="seq", sample_tokens=12)
    resumed = distill(teacher, chat_data, config(8), student_config="tiny", mode="seq", sample_tokens=12,
                      resume=True)
    assert resumed["steps"] == 8 and (out / "teacher_samples.jsonl").read_text() == samples  # the same samples
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 8 and losses[-1] < losses[0]  # one line per step across the resume
    assert resumed["after"]["val_kl"] < first["before"]["val_kl"]


def test_cli_distill_and_refusals(tiny_ckpt, chat_data, tmp_path, capsys):
    from llmlab.cli.main import main
    base = ["distill", "--teacher", str(tiny_ckpt), "--data", str(chat_data), "--seq-len", "64", "--micro-batch", "2",
            "--max-steps", "3", "--warmup-steps", "1", "--dtype", "float32", "--no-progress", "--threads", "1",
            "--peak-flops", "1e12", "--eval-every", "0"]
    assert main(base + ["--student-config", "tiny", "--out-dir", str(tmp_path / "a")]) == 0
    assert "top-1 agreement with the teacher" in capsys.readouterr().out
    assert (tmp_path / "a" / "model" / "config.json").is_file()
    assert main(base + ["--out-dir", str(tmp_path / "b")]) == 2  # no student
    assert "--student-config" in capsys.readouterr().err
    assert main(base + ["--student-config", "huge", "--out-dir", str(tmp_path / "c")]) == 2
    assert "neither a preset" in capsys.readouterr().err
    assert main(base + ["--student-config", "tiny", "--temperature", "0", "--out-dir", str(tmp_path / "d")]) == 2
    assert "temperature" in capsys.readouterr().err


def test_kl_terms_are_zero_for_the_same_distribution_and_scale_with_temperature():
    from llmlab.train.distill import kl_terms
    logits = torch.randn(5, 11)
    kl, agree = kl_terms(logits, logits, 2.0)
    assert torch.allclose(kl, torch.zeros(5), atol=1e-6) and bool((agree == 1).all())
    other = torch.randn(5, 11)
    kl1 = kl_terms(other, logits, 1.0)[0]
    expected = (logits.softmax(-1) * (logits.log_softmax(-1) - other.log_softmax(-1))).sum(-1)
    assert torch.allclose(kl1, expected, atol=1e-5) and bool((kl1 > 0).all())


def test_a_draft_that_knows_only_frequent_tokens_drafts_what_the_full_model_would(teacher, chat_data, tmp_path):
    """shrink_vocab keeps the full model's logits at the kept ids; saved with save_draft it drafts through
    --speculate draft:PATH with the target's ids (greedy output unchanged), never proposing the catch-all row."""
    import llmlab
    from llmlab.checkpoint.load import load_checkpoint
    from llmlab.engine import SamplingParams
    from llmlab.engine.draft import DRAFT_VOCAB, ModelDrafter
    from llmlab.engine.sequence import new_sequence
    from llmlab.engine.speculative import SpeculativeDecoder
    from llmlab.train.distill import frequent_tokens, load_examples, save_draft, shrink_vocab
    model, tokenizer, _ = load_checkpoint(teacher)
    examples = load_examples(chat_data, tokenizer)
    keep = frequent_tokens(examples, 60, always=[model.config.eos_token_id])
    assert len(keep) == 60 and keep[0] == model.config.eos_token_id and len(set(keep)) == 60
    small = shrink_vocab(model, keep)
    assert small.config.vocab_size == 61
    ids = [t for t in examples[0][0] if t in keep][:20]  # a context the small vocabulary covers
    with torch.no_grad():
        full_logits = model(torch.tensor([ids]))[0]
        small_logits = small(torch.tensor([[keep.index(t) for t in ids]]))[0]
    # the same layers on the same embeddings: only the head's row order differs (fp32 sums, tolerance 1e-4)
    assert torch.allclose(small_logits[:, :60], full_logits[:, keep], atol=1e-4)
    path = save_draft(model, keep, tmp_path / "draft", tokenizer)
    assert json.loads((path / DRAFT_VOCAB).read_text())["token_ids"] == keep
    big = llmlab.load(teacher)
    decoder = SpeculativeDecoder(big.engine, f"draft:{path}", draft_tokens=4, auto_off=False)
    prompt = big.prompt_ids("What is 3 + 4?")
    params = SamplingParams(temperature=0, max_new_tokens=16, ignore_eos=True)
    spec, plain = decoder.generate(prompt, params), big.engine.generate([prompt], params)[0]
    if spec.token_ids != plain.token_ids:  # a k + 1 token verify rounds differently from one-token steps (~1e-6)
        assert_greedy_up_to_ties(decode_logits(big.model, prompt, spec.token_ids), spec.token_ids, margin=1e-4)
    # the draft is the target itself on its frequent tokens: it drafts the target's own greedy token when kept
    in_vocab = sum(t in keep for t in spec.token_ids)
    assert decoder.stats.accepted >= 0.5 * in_vocab > 0, (decoder.stats, in_vocab)
    drafter = decoder.drafter
    assert isinstance(drafter, ModelDrafter) and drafter.token_ids.tolist() == keep
    draft = drafter.start(prompt, 64)  # sampled drafts: q lives on the target's vocabulary, zero off the list
    seq = new_sequence(tokenizer, SamplingParams(temperature=1.0, seed=0), prompt, 16,
                       vocab_size=model.config.vocab_size)
    tokens, q = draft.propose(prompt, 3, seq)
    assert q.shape == (3, model.config.vocab_size) and all(t in keep for t in tokens)
    outside = torch.ones(model.config.vocab_size, dtype=torch.bool)
    outside[keep] = False
    assert float(q[:, outside].sum()) == 0 and torch.allclose(q.sum(-1), torch.ones(3))
    (path / DRAFT_VOCAB).write_text(json.dumps({"token_ids": keep[:-1]}))
    with pytest.raises(LLMLabError, match="draft vocabulary"):
        SpeculativeDecoder(big.engine, f"draft:{path}")


def test_a_frequent_token_draft_of_smollm2_drafts_natively_and_keeps_greedy_output(smollm2):
    """SmolLM2 itself knowing 2,000 tokens plus the ones this text uses, as a draft in the native kernel (its own
    vocabulary: 8-bit head of 2,0xx rows) for fp32 SmolLM2: the mapped drafts are the target's tokens, so nearly
    all are kept (a 4-bit copy of the target; self-speculation keeps ~90%) and the greedy output is the plain one."""
    from llmlab.engine import SamplingParams
    from llmlab.engine.draft import ModelDrafter
    from llmlab.engine.speculative import SpeculativeDecoder
    from llmlab.train.distill import shrink_vocab
    prompt = smollm2.prompt_ids("List three colours of the rainbow.")
    params = SamplingParams(temperature=0, max_new_tokens=24)
    plain = smollm2.engine.generate([prompt], params)[0]
    keep = list(dict.fromkeys(list(range(2000)) + prompt + plain.token_ids))
    vocab = smollm2.model.config.vocab_size
    drafter = ModelDrafter(shrink_vocab(smollm2.model, keep), token_ids=keep, vocab_size=vocab)
    if drafter.step is None:
        pytest.skip("the native kernel does not run here")
    decoder = SpeculativeDecoder(smollm2.engine, drafter, draft_tokens=4, auto_off=False)
    spec = decoder.generate(prompt, params)
    if spec.token_ids != plain.token_ids:  # a k + 1 token verify rounds differently from one-token steps (~1e-6)
        assert_greedy_up_to_ties(decode_logits(smollm2.model, prompt, spec.token_ids), spec.token_ids, margin=1e-4)
    assert decoder.stats.acceptance_rate > 0.6, decoder.stats
