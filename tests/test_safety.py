"""AI-text detection and hallucination checks on the real SmolLM2, and their bad-input errors."""

import pytest

from llmlab.cli.main import main
from llmlab.client import GenParams, LocalClient
from llmlab.errors import LLMLabError
from llmlab.safety.detect import detection_scores, looks_machine
from llmlab.safety.detect_pairs import stdlib_paragraphs
from llmlab.safety.hallucination import check_grounding, mc_calibration, selfcheck, split_claims
from llmlab.safety.stats import expected_calibration_error


@pytest.fixture(scope="module")
def client(smollm2):
    return LocalClient(smollm2)


def test_detection_separates_greedy_continuations_from_stdlib_prose(smollm2, client):
    tok = smollm2.tokenizer
    paras = stdlib_paragraphs(tok, 4, 96)
    openings = [tok.decode(tok.encode(p)[:32]) for p in paras]
    gens = client.generate(openings, GenParams(max_tokens=40, temperature=0.0), chat=False)
    machine = detection_scores([o + g.text for o, g in zip(openings, gens)], smollm2, curvature=4)
    human = detection_scores([o + tok.decode(tok.encode(p)[32:32 + 40]) for o, p in zip(openings, paras)], smollm2,
                             curvature=4)
    for m, h in zip(machine, human):  # greedy text is the model's most likely: each pair, not just on average
        assert m["loglik"] > h["loglik"]
        assert m["logrank"] < h["logrank"]
    mean = lambda rows, k: sum(r[k] for r in rows) / len(rows)
    assert mean(machine, "entropy") < mean(human, "entropy")
    assert mean(machine, "binoculars") < mean(human, "binoculars")
    assert mean(machine, "curvature") > mean(human, "curvature")  # greedy text sits at a local maximum
    assert looks_machine(machine[0], {"loglik": machine[0]["loglik"] - 1})["loglik"] is True


def test_binoculars_refuses_two_tokenizers(smollm2, tiny_ckpt):
    import llmlab
    with pytest.raises(LLMLabError, match="share one tokenizer"):
        detection_scores(["Some text to score here."], smollm2, observer=llmlab.load(tiny_ckpt))


def test_grounding_supported_claim_beats_contradicted(client):
    context = ("Marie Dubois was born in Lyon in 1984. She studied chemistry at the University of Geneva and now "
               "works for Nestle.")
    result = check_grounding(client, context, "Marie Dubois was born in Lyon. Marie Dubois was born in Tokyo.")
    supported, contradicted = (c["support"] for c in result["claims"])
    assert result["n_claims"] == 2 and supported > contradicted
    with pytest.raises(LLMLabError, match="answer is empty"):
        check_grounding(client, context, "  ")


def test_selfcheck_scores_each_sentence(client):
    answer = "The capital of France is Paris. The capital of France is Berlin."
    result = selfcheck(client, "What is the capital of France?", k=2, max_tokens=24, answer=answer, method="unigram")
    assert [s["sentence"] for s in result["sentences"]] == split_claims(answer)
    assert len(result["samples"]) == 2 and all(0 <= s["support"] <= 1 for s in result["sentences"])
    with pytest.raises(LLMLabError, match="unknown consistency method"):
        selfcheck(client, "Q?", method="nli")


def test_mc_calibration_on_bios(client):
    result = mc_calibration(client, "bios_mc", n=6)
    assert result["n"] == 6 and sum(b["count"] for b in result["bins"]) == 6
    assert result["ece"] == pytest.approx(expected_calibration_error(result["confidences"], result["correct"]))
    n_choices = len(result["items"][0]["choices"])
    assert all(1 / n_choices - 1e-9 <= c <= 1 for c in result["confidences"])  # the top choice is at least uniform


@pytest.mark.parametrize("argv, message", [
    (["detect", "--detectors", "loglik,gltr", "some text"], "unknown detector 'gltr'"),
    (["check-grounding", "--context", "/nonexistent/ctx.txt", "--answer", "Paris."], "does not exist"),
    (["check-grounding", "--context", __file__, "--answer", " "], "the answer is empty"),
])
def test_cli_bad_input_is_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_cli_check_grounding(tmp_path, capsys):
    ctx = tmp_path / "ctx.txt"
    ctx.write_text("The Eiffel Tower is in Paris. It was finished in 1889.")
    assert main(["check-grounding", "--context", str(ctx), "--answer", "The Eiffel Tower is in Paris."]) == 0
    out = capsys.readouterr().out
    assert "The Eiffel Tower is in Paris." in out and "overall" in out


def test_detect_audit_section_reports_every_scored_detector_with_an_interval(tiny_ckpt, tmp_path):
    """The card's detection section on a tiny model: the small budget scores no curvature, and the section must
    report only the detectors it scored (it once looked up 'curvature' in every row and failed)."""
    from llmlab.client import connect
    from llmlab.safety.detect import audit_section
    section = audit_section(connect(model=str(tiny_ckpt)), "small", tmp_path, n_pairs=4)
    rows = section["data"]["auroc"]
    assert [r["detector"] for r in rows] == ["loglik", "logrank", "entropy", "binoculars"]
    for r in rows:
        assert r["ci"][0] <= r["auroc"] <= r["ci"][1]
        assert f"| {r['detector']} | {r['auroc']:.3f} [" in section["markdown"]
    assert (tmp_path / "detect_roc.png").stat().st_size > 1000
