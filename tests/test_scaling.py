"""Scaling-law fitting: recovers known constants from synthetic losses; a tiny real grid trains, fits and plots."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.optimize import minimize_scalar

from llmlab.train.scaling import ScalingFit, fit_scaling_law

CHINCHILLA = ScalingFit(E=1.69, A=406.4, alpha=0.34, B=410.7, beta=0.28)


def grid():
    N, D = np.meshgrid(np.geomspace(1e6, 1e9, 5), np.geomspace(1e8, 1e11, 5))
    return N.ravel(), D.ravel()


def test_fit_recovers_known_constants():
    N, D = grid()
    fit = fit_scaling_law(N, D, CHINCHILLA.loss(N, D))
    for name in ("E", "A", "alpha", "B", "beta"):
        assert getattr(fit, name) == pytest.approx(getattr(CHINCHILLA, name), rel=1e-3), name


def test_fit_tolerates_noise():
    N, D = grid()
    noisy = CHINCHILLA.loss(N, D) * np.exp(np.random.default_rng(0).normal(0, 0.002, N.shape))
    fit = fit_scaling_law(N, D, noisy)
    assert fit.E == pytest.approx(1.69, rel=0.05)
    assert fit.alpha == pytest.approx(0.34, abs=0.05) and fit.beta == pytest.approx(0.28, abs=0.05)


def test_compute_optimal_split_minimises_loss_along_the_budget():
    C = 1e21
    # independent check: minimise L(N, C / 6N) over log N numerically
    best = minimize_scalar(lambda logn: CHINCHILLA.loss(np.exp(logn), C / 6 / np.exp(logn)),
                           bounds=(np.log(1e6), np.log(1e13)), method="bounded", options={"xatol": 1e-9})
    n, d = CHINCHILLA.optimal(C)
    assert np.log(n) == pytest.approx(best.x, abs=1e-3)
    assert 6 * n * d == pytest.approx(C)
    assert CHINCHILLA.tokens_per_param(C) == pytest.approx(d / n)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    import random

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from llmlab.data.pack import pack_documents

    root = tmp_path_factory.mktemp("scaling_corpus")
    rng = random.Random(1)
    words = "red green blue cyan magenta yellow black white".split()
    docs = [" ".join(rng.choice(words[:4]) if rng.random() < 0.3 else words[i % 8] for i in range(rng.randrange(20, 60)))
            for _ in range(300)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(docs, trainers.BpeTrainer(vocab_size=280, special_tokens=["<|endoftext|>"],
                                                     initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    (root / "tok").mkdir()
    tok.save(str(root / "tok" / "tokenizer.json"))
    pack_documents(docs, root / "tok", root / "shards", val_fraction=0.1)
    return root / "shards"


def test_scaling_command_on_a_tiny_real_grid(shards, tmp_path, capsys):
    from llmlab.cli.train import main

    out = tmp_path / "grid"
    rc = main(["scaling", str(shards), "--sizes", "d16,d32,d48", "--tokens", "2048,8192", "--out-dir", str(out),
               "--seq-len", "32", "--micro-batch", "4", "--lr", "3e-3", "--min-lr", "3e-4", "--dtype", "float32",
               "--threads", "1", "--peak-flops", "1e12"])
    assert rc == 0
    result = json.loads((out / "scaling.json").read_text())
    runs = result["runs"]
    assert len(runs) == 6
    for size in ("d16", "d32", "d48"):
        short, long = sorted((r for r in runs if r["size"] == size), key=lambda r: r["D"])
        assert long["loss"] < short["loss"]  # more tokens, lower loss
    assert all(np.isfinite(v) for v in result["fit"].values())
    assert result["tokens_per_param_at_max_compute"] > 0
    assert "tokens per parameter" in capsys.readouterr().out
    assert (out / "scaling.png").read_bytes()[:4] == b"\x89PNG"
