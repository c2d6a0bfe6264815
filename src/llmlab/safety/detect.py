"""Zero-shot AI-text detection with the model itself: log-likelihood, log-rank, entropy and Binoculars scores.

Machine text sits where the model is confident: high log-likelihood, low token ranks, low entropy. Binoculars
(Hans et al. 2024) divides the performer's log-perplexity of the text by the cross-perplexity between an
observer and the performer (how surprised the performer is, on average, by the observer's next-token
distribution): a text can be surprising because it is human or because its topic is, and the ratio cancels
the topic. These need the full next-token distributions, so they run on in-process models (llmlab.load).
"""

from __future__ import annotations

import torch

from llmlab.errors import LLMLabError

DETECTORS = ("loglik", "logrank", "entropy", "binoculars", "curvature")
# +1: a higher raw score means machine-written; -1: a lower one does
MACHINE_SIGN = {"loglik": 1, "logrank": -1, "entropy": -1, "binoculars": -1, "curvature": 1}
CURVATURE_PERTURBATIONS = 8  # DetectGPT used 100 with T5 fills; a CPU budget allows a few
# thresholds on the raw scores for SmolLM2 (fp32, observer = performer): the accuracy-maximising cuts on the
# calibration half of the pairs (scores.json "thresholds") of the run `experiments/detect_zero_shot.py --n 120
# --curvature 8 --curvature-pairs 30` (2026-12-01, experiments/results/detect/): test-half accuracy loglik 0.96,
# logrank 0.96, entropy 0.70, binoculars 0.98. No curvature cut: on 30 pairs its AUROC was 0.42 [0.28, 0.58] and
# its test-half accuracy 0.50, no better than chance, so a verdict from it would mislead
THRESHOLDS = {"smollm2": {"loglik": -2.470, "logrank": 1.202, "entropy": 2.777, "binoculars": 0.922}}


def check_detectors(names) -> list[str]:
    names = list(names)
    for name in names:
        if name not in DETECTORS:
            raise LLMLabError(f"unknown detector {name!r} (one of {', '.join(DETECTORS)})")
    return names


def _ids(llm, text: str) -> list[int]:
    tok = llm.tokenizer
    prefix = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    ids = tok.encode(text)
    if len(ids) < 2:
        raise LLMLabError("a text to score for detection needs at least two tokens")
    window = llm.engine.context_len - 1
    return ([prefix] if prefix is not None else []) + ids[:window]


@torch.inference_mode()
def _logits(llm, batch: list[list[int]]) -> torch.Tensor:
    """Next-token logits (B, T-1, V) in fp32 for right-padded rows (causal attention: padding is harmless)."""
    width = max(len(r) for r in batch)
    idx = torch.zeros(len(batch), width, dtype=torch.long, device=llm.engine.device)
    for i, row in enumerate(batch):
        idx[i, :len(row)] = torch.tensor(row)
    return llm.model(idx)[:, :-1].float()


def _same_tokenizer(a, b) -> None:
    probe = "Binoculars needs one tokenizer: 12 tokens, π, \n\tdef f(x):"
    if a.tokenizer.encode(probe) != b.tokenizer.encode(probe) or \
            a.model.config.vocab_size != b.model.config.vocab_size:
        raise LLMLabError("the observer and the performer must share one tokenizer")


def detection_scores(texts: list[str], performer, observer=None, batch_size: int = 8, curvature: int = 0,
                     seed: int = 0) -> list[dict]:
    """Per text: loglik (mean log p of each token), logrank (mean log rank, 1 = top), entropy (mean entropy
    of the next-token distribution, nats) and binoculars (log-ppl under the performer / cross-perplexity of
    the observer's distributions under the performer). observer=None uses the performer as its own observer,
    when the cross-perplexity is the mean entropy. curvature=k > 0 adds the DetectGPT-style curvature from k
    perturbations (see curvature_scores)."""
    observer = observer if observer is not None else performer
    if observer is not performer:
        _same_tokenizer(observer, performer)
    out = []
    for start in range(0, len(texts), batch_size):
        rows = [_ids(performer, t) for t in texts[start:start + batch_size]]
        perf = _logits(performer, rows)
        obs = perf if observer is performer else _logits(observer, rows)
        for i, row in enumerate(rows):
            n = len(row) - 1
            targets = torch.tensor(row[1:], device=perf.device)
            logp = torch.log_softmax(perf[i, :n], -1)
            chosen = logp.gather(-1, targets[:, None])[:, 0]
            rank = 1 + (logp > chosen[:, None]).sum(-1)
            entropy = -(logp.exp() * logp).sum(-1)
            obs_p = torch.softmax(obs[i, :n], -1)
            cross = -(obs_p * logp).sum(-1)  # observer's distribution, performer's log-probabilities
            out.append({"loglik": float(chosen.mean()), "logrank": float(rank.float().log().mean()),
                        "entropy": float(entropy.mean()),
                        "binoculars": float(-chosen.mean() / cross.mean()), "n_tokens": n})
    if curvature:
        for row, c in zip(out, curvature_scores(texts, performer, curvature, seed=seed, batch_size=batch_size)):
            row["curvature"] = c
    return out


@torch.inference_mode()
def curvature_scores(texts: list[str], llm, k: int = CURVATURE_PERTURBATIONS, mask_share: float = 0.15,
                     span: int = 2, seed: int = 0, batch_size: int = 8) -> list[float]:
    """DetectGPT's normalised perturbation discrepancy (Mitchell et al. 2023): (log p(x) - mean log p(x~)) / std,
    over k perturbations x~ of the text. Machine text sits near a local maximum of the model's log-probability, so
    perturbing it loses more than perturbing human text. DetectGPT masks spans and refills them with T5; a causal
    model cannot see the words after a span, so here each masked span is refilled by sampling every token from the
    model's distribution after the original text before it (all from one forward, as Fast-DetectGPT's conditional
    sampling). k + 1 forwards per text."""
    if k < 2:
        raise LLMLabError(f"curvature needs at least 2 perturbations, got {k}")
    gen = torch.Generator().manual_seed(seed)
    out = []
    for text in texts:
        row = _ids(llm, text)
        n = len(row) - 1
        logits = _logits(llm, [row])[0, :n]
        probs = torch.softmax(logits, -1)
        starts = torch.rand(k, n, generator=gen) < mask_share / span
        masked = starts.clone()
        for j in range(1, span):
            masked[:, j:] |= starts[:, :-j]
        fills = torch.multinomial(probs, k, replacement=True, generator=gen).T  # (k, n): token j refilled at t
        original = torch.tensor(row[1:])
        perturbed = [[row[0]] + torch.where(masked[i], fills[i], original).tolist() for i in range(k)]
        lls = []
        for start in range(0, k + 1, batch_size):
            chunk = ([row] + perturbed)[start:start + batch_size]
            logp = torch.log_softmax(_logits(llm, chunk), -1)
            targets = torch.tensor([r[1:] for r in chunk])
            lls += logp.gather(-1, targets[..., None])[..., 0].sum(-1).tolist()
        base, pert = lls[0], torch.tensor(lls[1:])
        out.append(float((base - pert.mean()) / pert.std().clamp_min(1e-6)))
    return out


def looks_machine(scores: dict, thresholds: dict) -> dict[str, bool]:
    """Per detector with a threshold: whether the text falls on the machine side of it."""
    return {name: (scores[name] - cut) * MACHINE_SIGN[name] > 0 for name, cut in thresholds.items() if name in scores}


def audit_section(llm_or_client, budget: str = "small", out_dir=None, n_pairs: int | None = None) -> dict:
    """AUROC of each zero-shot detector (95% bootstrap intervals) on stdlib docstrings against this model's own
    continuations of the same openings (small: 16 pairs, no curvature; full: 120 pairs, curvature with 8
    perturbations; n_pairs overrides the count), and their ROC curves. Needs an in-process model."""
    import numpy as np

    from llmlab.safety.detect_pairs import make_pairs
    from llmlab.safety.perplexity import _local_llm
    from llmlab.safety.stats import auroc, bootstrap_auroc_interval
    title = "AI-text detection without a watermark"
    llm = _local_llm(llm_or_client)
    if llm is None:
        return {"title": title, "markdown": "Not measured: the detectors need full next-token distributions (an "
                "in-process model).", "data": {}, "plots": []}
    small = budget == "small"
    pairs = make_pairs(llm, n_pairs or (16 if small else 120), max_tokens=48 if small else 64, seed=0)
    curvature = 0 if small else CURVATURE_PERTURBATIONS
    human = detection_scores([p["human"] for p in pairs], llm, curvature=curvature)
    machine = detection_scores([p["machine"] for p in pairs], llm, curvature=curvature)
    rows, curves = [], {}
    for name in (d for d in DETECTORS if d in human[0]):
        sign = MACHINE_SIGN[name]
        m, h = sign * np.array([s[name] for s in machine]), sign * np.array([s[name] for s in human])
        rows.append({"detector": name, "auroc": auroc(m, h), "ci": bootstrap_auroc_interval(m, h)})
        cuts = np.sort(np.concatenate([m, h, [np.inf]]))[::-1]
        curves[name] = ([float((h >= c).mean()) for c in cuts], [float((m >= c).mean()) for c in cuts])
    lines = [f"{len(pairs)} pairs: Python stdlib docstring paragraphs (human) vs the model's continuations of the same "
             "32-token openings, cut to the same length; the model scores both (Binoculars with itself as observer)"
             + ("; the DetectGPT-style curvature runs at the full budget only." if small else "."), "",
             "| detector | AUROC [95% bootstrap] |", "|---|---|"]
    lines += [f"| {r['detector']} | {r['auroc']:.3f} [{r['ci'][0]:.3f}, {r['ci'][1]:.3f}]"
              f"{' *' if r['ci'][0] == r['ci'][1] else ''} |" for r in rows]
    if any(r["ci"][0] == r["ci"][1] for r in rows):
        lines += ["", f"\\* Perfect separation of {len(pairs)} pairs: resampling them cannot show the uncertainty (a "
                  "bootstrap interval of zero width), so read the larger run below."]
    lines += ["", "For scale, with 1.5B-20B models on news and stories: DetectGPT (Mitchell et al. 2023) reports "
              "AUROC 0.95 for its curvature against 0.81 for the best baseline on GPT-NeoX-20B; Binoculars (Hans et "
              "al. 2024) catches over 90% of ChatGPT text at a 0.01% false-positive rate. The 120-pair run with "
              "intervals is in `experiments/results/detect/`."]
    return {"title": title, "markdown": "\n".join(lines) + "\n", "data": {"n_pairs": len(pairs), "auroc": rows},
            "plots": [_roc_plot(curves, out_dir)]}


def _roc_plot(curves: dict, out_dir) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from llmlab.safety.watermark import save_plot
    fig, ax = plt.subplots(figsize=(4.5, 3.5))
    for name, (fpr, tpr) in curves.items():
        ax.plot(fpr, tpr, label=name)
    ax.plot([0, 1], [0, 1], ":", color="gray")
    ax.set_xlabel("false positive rate (human called machine)")
    ax.set_ylabel("true positive rate")
    ax.set_title("Zero-shot detection ROC", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return save_plot(fig, out_dir, "detect_roc.png")
