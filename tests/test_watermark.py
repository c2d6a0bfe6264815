"""The green-list watermark: the z-test by hand, the sampler hook, detection on real SmolLM2 text, and the CLI's
errors (bad settings, key and tokenizer mismatch)."""

import json
import math

import pytest
import torch

from llmlab.cli.main import main
from llmlab.engine import SamplingParams
from llmlab.errors import LLMLabError
from llmlab.safety.detect_pairs import stdlib_paragraphs
from llmlab.safety.watermark import (GreenList, WatermarkConfig, detect, detect_ids, key_fingerprint, p_value, sample,
                                     watermark_record, z_score)


def test_z_score_and_p_value_by_hand():
    # 70 green of 200 at gamma 0.25: (70 - 50) / sqrt(200 * 0.25 * 0.75) = 20 / 6.12372 = 3.26599
    assert z_score(70, 200, 0.25) == pytest.approx(3.26599, abs=1e-5)
    assert p_value(3.26599) == pytest.approx(5.4532e-4, rel=1e-3)  # 1 - Phi(3.266), from a normal table
    assert z_score(50, 200, 0.25) == 0.0 and p_value(0.0) == 0.5


@pytest.mark.parametrize("scheme, width", [("lefthash", 1), ("lefthash", 3), ("selfhash", 4)])
def test_green_share_is_gamma(scheme, width):
    greens = GreenList(WatermarkConfig("k", gamma=0.25, context_width=width, scheme=scheme))
    share = float(greens.green([5, 17, 923, 4000], torch.arange(49152)).float().mean())
    assert abs(share - 0.25) < 0.015  # binomial sd over 49,152 tokens is 0.002: 7 sd of room
    other = GreenList(WatermarkConfig("another key", context_width=width, scheme=scheme))
    agree = (greens.green([5, 17, 923, 4000], torch.arange(49152)) == other.green([5, 17, 923, 4000],
                                                                                   torch.arange(49152))).float().mean()
    assert float(agree) < 0.7  # independent lists agree on 0.25^2 + 0.75^2 = 62.5% of tokens


def test_logits_processor_hook_in_the_engine(smollm2):
    forced = smollm2.tokenizer.encode(" banana")[0]

    def force(context, logits):
        assert context[:len(prompt)] == prompt  # the processor sees prompt + generated tokens
        return logits + 1000.0 * (torch.arange(logits.shape[-1]) == forced)
    prompt = smollm2.prompt_ids("Say something.")
    done = smollm2.engine.generate([prompt], SamplingParams(temperature=0.7, max_new_tokens=4, seed=0,
                                                             logits_processors=[force], logprobs=True))[0]
    assert done.token_ids == [forced] * 4
    assert all(lp < -1 for lp in done.logprobs)  # logprobs stay the raw model's, not the processed ones


def test_watermarked_smollm2_text_is_detected_and_plain_text_is_not(smollm2):
    config = WatermarkConfig("test-key", gamma=0.25, delta=2.0)
    prompt = ["Write a story about a lighthouse keeper who finds a message in a bottle."]
    marked = sample(smollm2, prompt, config, max_new_tokens=200, temperature=1.0, seed=0)[0]
    z_marked = detect_ids(marked.token_ids, config)
    assert z_marked["z"] > 4 and z_marked["scored"] > 100
    # unwatermarked text: ~200 tokens of stdlib docstrings (human-written; experiments/watermark.py has the
    # model's own plain answers too, at z ~ 0)
    human = " ".join(stdlib_paragraphs(smollm2.tokenizer, 3, 70))
    plain = detect(human, smollm2.tokenizer, config)
    assert plain["scored"] > 150 and abs(plain["z"]) < 2
    assert abs(detect_ids(marked.token_ids, WatermarkConfig("wrong key"))["z"]) < 3  # a wrong key finds nothing
    text = smollm2.tokenizer.decode(marked.token_ids)
    assert detect(text, smollm2.tokenizer, config)["z"] > 4  # through text and back to tokens


def test_cli_detect_checks_a_record_key_and_tokenizer(smollm2, tmp_path, capsys):
    config = WatermarkConfig("k1")
    marked = sample(smollm2, ["Describe a busy market."], config, max_new_tokens=40, seed=0)[0]
    record = watermark_record(smollm2.tokenizer.decode(marked.token_ids), smollm2.tokenizer, config)
    path = tmp_path / "rec.json"
    path.write_text(json.dumps(record))
    assert main(["watermark", "detect", str(path), "--key", "k1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["key_fingerprint"] == key_fingerprint("k1")
    assert main(["watermark", "detect", str(path), "--key", "k2"]) == 2
    err = capsys.readouterr().err
    assert "watermark key mismatch" in err and err.count("\n") == 1
    record["watermark"]["tokenizer"] = "0" * 16
    path.write_text(json.dumps(record))
    assert main(["watermark", "detect", str(path), "--key", "k1"]) == 2
    assert "tokenizer mismatch" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["generate", "hi", "--watermark", "k", "--watermark-gamma", "1.5"], "gamma must be in (0, 1)"),
    (["generate", "hi", "--watermark", "k", "--watermark-scheme", "minhash"], "unknown watermark scheme"),
    (["generate", "hi", "--watermark", "k", "--beam", "2"], "cannot be combined with --beam"),
    (["chat", "--watermark", "k", "--endpoint", "http://127.0.0.1:9/v1"], "needs an in-process model"),
    (["serve", "--watermark", "k", "--watermark-delta", "-1"], "delta must be in [0, 50]"),
    (["watermark", "detect", "/nonexistent.txt", "--key", "k"], "does not exist"),
])
def test_cli_bad_watermark_input_is_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_config_errors():
    with pytest.raises(LLMLabError, match="context width"):
        WatermarkConfig("k", context_width=0)
    with pytest.raises(LLMLabError, match="non-empty string"):
        WatermarkConfig("")
    with pytest.raises(LLMLabError, match="too short"):
        detect_ids([1], WatermarkConfig("k"))
    assert math.isclose(WatermarkConfig("k").public()["gamma"], 0.25) and "key" not in WatermarkConfig("k").public()


def test_server_option_watermarks_answers(smollm2):
    """`llmlab serve --watermark KEY` installs the processor on the model's sampling defaults: a real server's
    completion then carries the watermark."""
    import httpx

    from llmlab.safety.watermark import install
    from llmlab.serve.testing import running_server
    config = WatermarkConfig("server-key")
    install(smollm2, config)
    try:
        with running_server(smollm2) as base:
            body = {"model": "smollm2", "prompt": "Once upon a time, in a small village by the sea,",
                    "max_tokens": 80, "temperature": 1.0, "seed": 0}
            text = httpx.post(f"{base}/v1/completions", json=body, timeout=600).json()["choices"][0]["text"]
    finally:
        smollm2.sampling_defaults.pop("logits_processors")  # the session's model stays unwatermarked
    result = detect(text, smollm2.tokenizer, config)
    assert result["scored"] > 30 and result["z"] > 2.5  # ~80 tokens: a strong watermark gives z ~ 6
