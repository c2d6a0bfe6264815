"""Quality of human labels: agreement between annotators (Cohen, Fleiss, Krippendorff), aggregation (majority vote,
Dawid-Skene), each annotator's estimated reliability, and flagging annotators who disagree with the consensus.

Labels come as (item, annotator, label) triples: an item may have any number of labels, an annotator may skip items.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from itertools import combinations

import numpy as np
from scipy.stats import binomtest

from llmlab.errors import LLMLabError
from llmlab.eval.judge.agreement import cohen_kappa

__all__ = ["cohen_kappa", "pairwise_cohen", "fleiss_kappa", "category_counts", "krippendorff_alpha",
           "majority_vote", "dawid_skene", "flag_annotators", "report"]


def by_item(triples) -> dict:
    """{item: {annotator: label}}; one label per annotator and item (a second one is refused, not overwritten)."""
    items: dict = defaultdict(dict)
    for item, annotator, label in triples:
        if label is None:
            continue
        if annotator in items[item] and items[item][annotator] != label:
            raise LLMLabError(f"annotator {annotator!r} gave item {item!r} two different labels")
        items[item][annotator] = label
    if not items:
        raise LLMLabError("no labels")
    return dict(items)


def pairwise_cohen(triples) -> dict[tuple, dict]:
    """Cohen's kappa for every pair of annotators, over the items both labelled (pairs sharing < 2 items left out)."""
    items = by_item(triples)
    annotators = sorted({a for labels in items.values() for a in labels}, key=str)
    out = {}
    for a, b in combinations(annotators, 2):
        shared = [labels for labels in items.values() if a in labels and b in labels]
        if len(shared) >= 2:
            out[(a, b)] = {"n": len(shared), "kappa": cohen_kappa([s[a] for s in shared], [s[b] for s in shared])}
    return out


def category_counts(triples) -> tuple[np.ndarray, list]:
    """An items x categories matrix of how many annotators put each item in each category, and the categories."""
    items = by_item(triples)
    categories = sorted({l for labels in items.values() for l in labels.values()}, key=str)
    index = {c: k for k, c in enumerate(categories)}
    counts = np.zeros((len(items), len(categories)))
    for i, labels in enumerate(items.values()):
        for label in labels.values():
            counts[i, index[label]] += 1
    return counts, categories


def fleiss_kappa(counts) -> float:
    """Fleiss' kappa from an items x categories count matrix; every item must have the same number of ratings."""
    counts = np.asarray(counts, dtype=float)
    per_item = counts.sum(axis=1)
    if counts.ndim != 2 or len(counts) == 0 or per_item[0] < 2 or np.any(per_item != per_item[0]):
        raise LLMLabError("Fleiss' kappa needs the same number (>= 2) of ratings for every item; "
                          "use Krippendorff's alpha when labels are missing")
    n = per_item[0]
    p_cat = counts.sum(axis=0) / counts.sum()
    p_item = ((counts * (counts - 1)).sum(axis=1)) / (n * (n - 1))
    p_bar, p_e = p_item.mean(), (p_cat ** 2).sum()
    if p_e == 1.0:
        return 1.0
    return float((p_bar - p_e) / (1 - p_e))


def krippendorff_alpha(triples) -> float:
    """Krippendorff's alpha for nominal labels, missing labels allowed: 1 - D_observed / D_expected, from the
    coincidence matrix of the items with at least two labels."""
    items = by_item(triples)
    categories = sorted({l for labels in items.values() for l in labels.values()}, key=str)
    index = {c: k for k, c in enumerate(categories)}
    coincidence = np.zeros((len(categories), len(categories)))
    for labels in items.values():
        m = len(labels)
        if m < 2:
            continue  # a lone label has nothing to agree with
        counts = np.zeros(len(categories))
        for label in labels.values():
            counts[index[label]] += 1
        coincidence += (np.outer(counts, counts) - np.diag(counts)) / (m - 1)
    n_c = coincidence.sum(axis=1)
    n = n_c.sum()
    if n < 2:
        raise LLMLabError("Krippendorff's alpha needs at least one item with two labels")
    observed = coincidence.sum() - np.trace(coincidence)
    expected = (n_c.sum() ** 2 - (n_c ** 2).sum()) / (n - 1)
    if expected == 0:
        return 1.0
    return float(1 - observed / expected)


def majority_vote(triples) -> dict:
    """{item: the most frequent label}; a tie goes to the label most frequent over all items, then the first by name
    (deterministic)."""
    items = by_item(triples)
    overall = Counter(l for labels in items.values() for l in labels.values())
    out = {}
    for item, labels in items.items():
        votes = Counter(labels.values())
        out[item] = max(votes, key=lambda l: (votes[l], overall[l], [-ord(ch) for ch in str(l)]))
    return out


def dawid_skene(triples, iters: int = 200, tol: float = 1e-8, smoothing: float = 0.01) -> dict:
    """Dawid & Skene (1979): EM over the true label of each item and each annotator's confusion matrix
    P(says l | truth k), started from the vote shares. Returns posteriors, labels, class priors, confusions and
    each annotator's reliability: the expected fraction of their labels that are correct."""
    items = by_item(triples)
    names = list(items)
    annotators = sorted({a for labels in items.values() for a in labels}, key=str)
    categories = sorted({l for labels in items.values() for l in labels.values()}, key=str)
    aidx, cidx = {a: j for j, a in enumerate(annotators)}, {c: k for k, c in enumerate(categories)}
    obs = [(i, aidx[a], cidx[l]) for i, item in enumerate(names) for a, l in items[item].items()]
    ii, jj, ll = (np.array(x) for x in zip(*obs))
    n_items, n_ann, k = len(names), len(annotators), len(categories)
    post = np.zeros((n_items, k))
    np.add.at(post, (ii, ll), 1.0)
    post /= post.sum(axis=1, keepdims=True)
    previous = -np.inf
    for _ in range(iters):
        prior = post.mean(axis=0)
        confusion = np.full((n_ann, k, k), smoothing)  # [annotator, truth, said]
        np.add.at(confusion, (jj, slice(None), ll), post[ii])
        confusion /= confusion.sum(axis=2, keepdims=True)
        log_post = np.tile(np.log(prior + 1e-300), (n_items, 1))
        np.add.at(log_post, ii, np.log(confusion[jj, :, ll]))
        top = log_post.max(axis=1, keepdims=True)
        likelihood = float((top[:, 0] + np.log(np.exp(log_post - top).sum(axis=1))).sum())
        post = np.exp(log_post - top)
        post /= post.sum(axis=1, keepdims=True)
        if likelihood - previous < tol:
            break
        previous = likelihood
    said_right = np.zeros(n_ann)
    np.add.at(said_right, jj, post[ii, ll])
    reliability = said_right / np.bincount(jj, minlength=n_ann)
    return {"labels": {item: categories[int(post[i].argmax())] for i, item in enumerate(names)},
            "posteriors": {item: dict(zip(categories, post[i].tolist())) for i, item in enumerate(names)},
            "prior": dict(zip(categories, post.mean(axis=0).tolist())),
            "confusion": {a: confusion[j].tolist() for a, j in aidx.items()}, "categories": categories,
            "reliability": {a: float(reliability[j]) for a, j in aidx.items()}}


def flag_annotators(triples, alpha: float = 0.05) -> list[dict]:
    """Each annotator's agreement with the consensus of the *others* (majority vote without them, so a bad annotator
    cannot pull the consensus toward themself), tested one-sided against the mean agreement of everyone:
    P(agreeing this rarely | that mean rate) by the exact binomial. Flagged when p < alpha / number of annotators
    (Bonferroni: with many annotators someone is always unlucky)."""
    items = by_item(triples)
    annotators = sorted({a for labels in items.values() for a in labels}, key=str)
    tallies = {}
    for a in annotators:
        others = [(item, b, l) for item, labels in items.items() if a in labels for b, l in labels.items() if b != a]
        consensus = majority_vote(others) if others else {}
        hits = [items[item][a] == label for item, label in consensus.items()]
        tallies[a] = (sum(hits), len(hits))
    total = sum(n for _, n in tallies.values())
    if total == 0:
        raise LLMLabError("no item has labels from two annotators: nothing to compare")
    rate = sum(k for k, _ in tallies.values()) / total
    rows = []
    for a, (agree, n) in tallies.items():
        p = binomtest(agree, n, rate, alternative="less").pvalue if n and 0 < rate < 1 else 1.0
        rows.append({"annotator": a, "items": n, "agreement": agree / n if n else None, "mean_agreement": rate,
                     "p_value": float(p), "flagged": bool(p < alpha / len(annotators))})
    return sorted(rows, key=lambda r: r["p_value"])


def report(triples) -> dict:
    """Everything above for one set of labels (what `llmlab arena agreement` prints)."""
    counts, _ = category_counts(triples)
    per_item = counts.sum(axis=1)
    same = len(per_item) > 0 and per_item[0] >= 2 and np.all(per_item == per_item[0])
    ds = dawid_skene(triples)
    majority = majority_vote(triples)
    return {"items": len(per_item), "labels": int(per_item.sum()), "krippendorff_alpha": krippendorff_alpha(triples),
            "fleiss_kappa": fleiss_kappa(counts) if same else None,
            "pairwise_cohen": {f"{a} / {b}": v for (a, b), v in pairwise_cohen(triples).items()},
            "reliability": ds["reliability"], "flags": flag_annotators(triples),
            "majority_vs_dawid_skene": sum(majority[i] == ds["labels"][i] for i in majority) / len(majority)}
