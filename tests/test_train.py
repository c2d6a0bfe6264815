"""The training loop and `llmlab pretrain`: learning, exact resume, Ctrl-C, crash-safe checkpoints, DDP, FSDP2,
HF export."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from llmlab.cli.train import main as train_cli
from llmlab.train.metrics import read_metrics

WORDS = "alpha beta gamma delta epsilon zeta eta theta".split()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Packed shards of a deterministic process (words counted cyclically from a random start) + its tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from llmlab.data.pack import pack_documents

    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    docs = []
    for _ in range(400):
        s = rng.randrange(len(WORDS))
        docs.append(" ".join(WORDS[(s + i) % len(WORDS)] for i in range(rng.randrange(20, 60))))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(docs, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                     initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    (root / "tok").mkdir()
    tok.save(str(root / "tok" / "tokenizer.json"))
    pack_documents(docs, root / "tok", root / "shards", val_fraction=0.1)
    return root


def args(corpus, out, *extra):
    return ["pretrain", str(corpus / "shards"), "--out-dir", str(out), "--seq-len", "32", "--micro-batch", "4",
            "--warmup-steps", "5", "--lr", "3e-3", "--min-lr", "3e-4", "--no-progress", "--peak-flops", "1e12",
            "--eval-every", "0", "--threads", "1", *extra]


EXACT = ["--dtype", "float32", "--deterministic", "--max-steps", "40"]


def losses(out) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(Path(out) / "metrics.jsonl") if "loss" in r}


def latest_step(out) -> int | None:
    pointer = Path(out) / "checkpoints" / "latest"
    return int(pointer.read_text().split("_")[1]) if pointer.exists() else None


def start_cli(argv, **kw):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "llmlab.cli.train", *argv], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def wait_for_checkpoint(proc, out, at_least=1, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        step = latest_step(out)
        if step is not None and step >= at_least:
            return step
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.01)
    raise AssertionError("no checkpoint appeared")


def test_loss_falls_below_unigram_entropy_and_model_loads_in_transformers(corpus, tmp_path):
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "run"
    assert train_cli(args(corpus, out, "--tokenizer", str(corpus / "tok"), "--max-steps", "80",
                          "--eval-every", "40", "--save-every", "40", "--dtype", "float32")) == 0
    train_tokens = np.fromfile(corpus / "shards" / "train_000.bin", dtype=np.uint16)
    p = np.bincount(train_tokens) / len(train_tokens)
    unigram_entropy = -(p[p > 0] * np.log(p[p > 0])).sum()  # nats: the best a model blind to context does
    records = read_metrics(out / "metrics.jsonl")
    val = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in val] == [40, 80]
    assert val[-1]["val_loss"] < 0.3 * unigram_entropy, (val, unigram_entropy)
    assert 0 < val[-1]["val_bpb"] < val[0]["val_bpb"]
    assert len(val[-1]["samples"]) == 2 and all(isinstance(s, str) for s in val[-1]["samples"])
    train_records = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_records] == list(range(1, 81))
    assert all(r["tok_per_s"] > 0 and 0 < r["mfu"] for r in train_records)
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the final model is an ordinary Hugging Face directory, with the tokenizer copied in
    final = out / "model"
    assert (final / "tokenizer.json").read_bytes() == (corpus / "tok" / "tokenizer.json").read_bytes()
    from llmlab.checkpoint.hf import load_hf_dir
    ours = load_hf_dir(final).eval()
    hf = transformers.AutoModelForCausalLM.from_pretrained(final).eval()
    idx = torch.from_numpy(train_tokens[:32].astype(np.int64))[None]
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, ours(idx), atol=1e-4, rtol=1e-4)


def test_resume_after_sigkill_matches_uninterrupted_run(corpus, tmp_path):
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    proc = start_cli(args(corpus, killed, *EXACT, "--save-every", "10"))
    wait_for_checkpoint(proc, killed, at_least=10)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    stopped_at = latest_step(killed)
    assert stopped_at < 40 and not (killed / "model").exists(), "the run finished before it could be killed"
    assert train_cli(args(corpus, killed, *EXACT, "--save-every", "10", "--resume")) == 0
    assert train_cli(args(corpus, reference, *EXACT, "--save-every", "0")) == 0
    ref, resumed = losses(reference), losses(killed)
    assert sorted(resumed) == list(range(1, 41))  # lines logged after the last checkpoint were dropped, not repeated
    for step in range(stopped_at + 1, 41):
        assert abs(resumed[step] - ref[step]) <= 1e-6, (step, resumed[step], ref[step])
    assert ref[40] < ref[1]


def test_sigint_saves_and_exits_cleanly(corpus, tmp_path):
    out = tmp_path / "run"
    proc = start_cli(args(corpus, out, *EXACT, "--max-steps", "100000", "--save-every", "5"))
    wait_for_checkpoint(proc, out, at_least=5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    step = latest_step(out)
    assert step >= 5 and max(losses(out)) == step  # saved exactly where it stopped
    from llmlab.train.ckpt import load_checkpoint
    model_state, _, _, state = load_checkpoint(out / "checkpoints")
    assert state["step"] == step and "lm_head.weight" in model_state


def test_resume_with_a_different_config_names_the_field(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    # (bf16 autocast, the default dtype, so that path runs here too)
    assert train_cli(args(corpus, out, "--max-steps", "2")) == 0
    capsys.readouterr()
    assert train_cli(args(corpus, out, "--max-steps", "4", "--lr", "1e-3", "--resume")) == 1
    assert "its training setting lr was 0.003" in capsys.readouterr().err
    assert train_cli(args(corpus, out, "--max-steps", "4", "--dim", "32", "--resume")) == 1
    assert "model setting dim" in capsys.readouterr().err
    # and a fresh run into a used directory is refused rather than silently clobbering it
    assert train_cli(args(corpus, out, "--max-steps", "4")) == 1
    assert "--resume" in capsys.readouterr().err
    # a change that does not alter the computation is accepted
    assert train_cli(args(corpus, out, "--max-steps", "4", "--save-every", "7", "--resume")) == 0
    assert latest_step(out) == 4


def test_crash_during_save_leaves_latest_loadable(tmp_path, monkeypatch):
    from llmlab.train import ckpt

    weights = {"w": torch.arange(6.0).view(2, 3)}
    ckpt.save_checkpoint(tmp_path, 1, weights, {"state": {}, "param_groups": []}, {"data": {"position": 1}})

    def torch_save_then_die(obj, path):
        Path(path).write_bytes(b"half a file")
        raise KeyboardInterrupt("killed while saving")

    monkeypatch.setattr(ckpt.torch, "save", torch_save_then_die)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(tmp_path, 2, {"w": torch.zeros(2, 3)}, {}, {"data": {"position": 2}})
    monkeypatch.undo()
    model_state, _, _, state = ckpt.load_checkpoint(tmp_path)
    assert state["step"] == 1 and torch.equal(model_state["w"], weights["w"])
    # a half-written directory a SIGKILL leaves behind is ignored, then cleared by the next save
    (tmp_path / ".step_00000002.abc.tmp").mkdir()
    assert ckpt.load_checkpoint(tmp_path)[3]["step"] == 1
    for step in (2, 3, 4):
        ckpt.save_checkpoint(tmp_path, step, weights, {}, {"data": {}}, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_00000003", "step_00000004"]
    assert ckpt.load_checkpoint(tmp_path)[3]["step"] == 4


def test_ddp_two_processes_matches_single_process(corpus, tmp_path):
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    common = ["--dtype", "float32", "--max-steps", "12", "--save-every", "0"]
    # the same global batch: 1 process x 2 accumulated micro-batches of 4 == 2 processes x 1 micro-batch of 4
    assert train_cli(args(corpus, single, *common, "--grad-accum", "2")) == 0
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "llmlab.cli.train", *args(corpus, ddp, *common)],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    a, b = losses(single), losses(ddp)
    assert sorted(a) == sorted(b) == list(range(1, 13))
    for step in a:
        assert abs(a[step] - b[step]) < 1e-4, (step, a[step], b[step])
    assert a[12] < a[1] - 0.5  # and it did learn: equal curves that stay flat would prove nothing


def test_fsdp_two_processes_matches_single_process_and_resumes(corpus, tmp_path):
    """FSDP2 (parameters sharded over 2 CPU processes on gloo) computes what one process does, and resumes."""
    single, fsdp = tmp_path / "single", tmp_path / "fsdp"
    common = ["--dtype", "float32", "--max-steps", "8", "--save-every", "4"]
    assert train_cli(args(corpus, single, *common, "--grad-accum", "2")) == 0
    env = dict(os.environ, OMP_NUM_THREADS="1")

    def torchrun(*extra):
        run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                              "-m", "llmlab.cli.train", *args(corpus, fsdp, "--fsdp", *extra)],
                             env=env, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]

    torchrun("--dtype", "float32", "--max-steps", "4", "--save-every", "4")
    torchrun(*common, "--resume")
    a, b = losses(single), losses(fsdp)
    assert sorted(a) == sorted(b) == list(range(1, 9))
    for step in a:
        assert abs(a[step] - b[step]) < 1e-4, (step, a[step], b[step])
    assert a[8] < a[1] - 0.5
    # the sharded weights gathered into the final checkpoint are the single process's (fp32 sums in another
    # order across 2 ranks: equal to rounding, as the losses above)
    from safetensors.torch import load_file
    ours, theirs = load_file(single / "model" / "model.safetensors"), load_file(fsdp / "model" / "model.safetensors")
    assert sorted(ours) == sorted(theirs)
    for name in ours:
        torch.testing.assert_close(theirs[name], ours[name], atol=1e-4, rtol=0, msg=name)
