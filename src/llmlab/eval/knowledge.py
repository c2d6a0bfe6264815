"""Knowledge evaluation on the bios world: does a model complete the facts of people it read about, how well does
it predict their biographies, can it answer questions about them, and does a preference-tuned model rank a right
answer above a wrong one."""

from __future__ import annotations

import random
from collections import Counter

import torch

from llmlab.eval.metrics import bits_per_byte, perplexity

# Completion probes: the sentence start of one of the world's own templates, answered by the attribute's value.
PROBES = {
    "birth_date": "{name} was born on",
    "birth_city": "{name} was born in",
    "university": "{name} graduated from",
    "major": "{name} majored in",
    "employer": "{name} worked for",
    "employer_city": "{name} worked in",
}
QA_TOKENS = 32  # the longest answer, a university name, is 22 tokens in a 512-token vocabulary


def probe_facts(llm, world, people_idx: list[int]) -> dict:
    """Greedy completion of "<name> was born in" style probes; exact match of the text up to the first period.
    The baseline always answers the attribute's most common value (what a model knowing no one would do)."""
    from llmlab.engine import SamplingParams

    eos = llm.tokenizer.eos_token_id
    asked = [(i, attr) for i in people_idx for attr in PROBES]
    # a document starts right after an EOS in the packed stream, so the probe does too
    prompts = [[eos] + llm.tokenizer.encode(PROBES[a].format(name=world.people[i].name)) for i, a in asked]
    done = llm.engine.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=16, stop=["."]))
    right, examples = Counter(), []
    for c, (i, attr) in zip(done, asked):
        got, expected = c.text.strip(), getattr(world.people[i], attr)
        right[attr] += got == expected
        if len(examples) < 12:
            examples.append({"prompt": PROBES[attr].format(name=world.people[i].name), "expected": expected,
                             "got": got, "correct": got == expected})
    accuracy = {a: right[a] / len(people_idx) for a in PROBES}
    baseline = {a: Counter(getattr(world.people[i], a) for i in people_idx).most_common(1)[0][1] / len(people_idx)
                for a in PROBES}
    return {"accuracy": accuracy, "mean_accuracy": sum(accuracy.values()) / len(accuracy), "baseline": baseline,
            "mean_baseline": sum(baseline.values()) / len(baseline), "probes": len(prompts), "examples": examples}


@torch.no_grad()
def document_scores(model, tokenizer, texts: list[str]) -> dict:
    """Bits per UTF-8 byte and perplexity per token of whole documents, each scored after an EOS (as packed)."""
    from llmlab.engine.scoring import token_logprobs

    logprob = n_tokens = n_bytes = 0
    for text in texts:
        ids = ([tokenizer.eos_token_id] + tokenizer.encode(text))[:model.config.max_seq_len + 1]
        x = torch.tensor([ids])
        logprob += token_logprobs(model(x[:, :-1])[0], x[0, 1:]).sum().item()
        n_tokens += len(ids) - 1
        n_bytes += len(tokenizer.decode(ids[1:]).encode("utf-8"))
    return {"bits_per_byte": bits_per_byte(logprob, n_bytes), "perplexity": perplexity(logprob, n_tokens),
            "documents": len(texts), "tokens": n_tokens}


def heldout_biographies(world, people_idx: list[int], augment: str, seen: int) -> list[str]:
    """Each chosen person's wording number seen + 1, when training saw the first `seen`: known facts in sentences
    the model never read."""
    all_bios = list(world.biographies(augment, seen + 1))
    return [all_bios[i * (seen + 1) + seen] for i in people_idx]


def unseen_biographies(world, n: int, augment: str) -> list[str]:
    """Biographies of n people who are not in `world`: their facts cannot be known, only guessed."""
    from llmlab.data.bios import make_bios_world

    other = make_bios_world(n + len(world.people), world.seed + 1)
    ours = {p.name for p in world.people}
    keep = [i for i, p in enumerate(other.people) if p.name not in ours][:n]
    bios = list(other.biographies(augment, 1))
    return [bios[i] for i in keep]


def sample_texts(llm, world, people_idx: list[int], seed: int) -> list[dict]:
    """What the model writes after a known person's name, sampled at temperature 0.7."""
    from llmlab.engine import SamplingParams

    names = [world.people[i].name for i in people_idx[:3]]
    done = llm.engine.generate([[llm.tokenizer.eos_token_id] + llm.tokenizer.encode(n) for n in names],
                               SamplingParams(temperature=0.7, max_new_tokens=48, seed=seed))
    return [{"prompt": n, "completion": c.text} for n, c in zip(names, done)]


def knowledge_report(model_dir, world, people_idx: list[int], known_bios: list[str], unseen_bios: list[str],
                     seed: int) -> dict:
    """A pretrained model's knowledge: fact probes, held-out biographies of known and of unseen people, samples."""
    from llmlab.api import load

    llm = load(model_dir)
    llm.model.eval()
    return {"facts": probe_facts(llm, world, people_idx),
            "heldout_known": document_scores(llm.model, llm.tokenizer, known_bios),
            "heldout_unseen": document_scores(llm.model, llm.tokenizer, unseen_bios),
            "samples": sample_texts(llm, world, people_idx, seed)}


def qa_scores(model, tokenizer, world, items: list[dict], examples: int = 4) -> dict:
    """Greedy answers to bios QA items (train.tasks.bios_qa_items): exact match, and the share of answers of the
    right kind (some person's value of the attribute asked about, right or wrong: the model learned how to answer,
    if not what)."""
    from llmlab.train.sft import answer
    from llmlab.train.tasks import normalise

    replies = answer(model, tokenizer, [it["messages"] for it in items], QA_TOKENS)
    values = {a: {getattr(p, a) for p in world.people} for a in PROBES}
    right = sum(normalise(r) == it["answer"] for r, it in zip(replies, items))
    kind = sum(normalise(r) in values[it["attribute"]] for r, it in zip(replies, items))
    return {"exact_match": right / max(1, len(items)), "right_kind": kind / max(1, len(items)),
            "questions": len(items),
            "examples": [{"question": it["messages"][0]["content"], "expected": it["answer"], "got": r.strip()}
                         for r, it in zip(replies[:examples], items)]}


def preference_pairs(world, items: list[dict], seed: int) -> list[dict]:
    """{"messages", "chosen", "rejected"} per QA item: the right answer against another person's value of the same
    attribute."""
    rng = random.Random(f"pairs/{seed}")
    return [{"messages": it["messages"], "chosen": it["answer"],
             "rejected": world.other_value(it["attribute"], it["answer"], rng)} for it in items]


def implicit_rewards(policy, reference, tokenizer, records: list[dict], beta: float, seq_len: int) -> dict:
    """DPO's implicit reward beta * (log pi - log pi_ref) of the chosen and the rejected answer over a set of
    pairs: the share with the chosen answer above the rejected one, and the mean margin between them."""
    from llmlab.train.chat_data import pair_rows, preference_pair
    from llmlab.train.dpo import reference_logps
    from llmlab.train.sft import pad_id_of

    rows = pair_rows([preference_pair(r, tokenizer) for r in records], seq_len)
    pad = pad_id_of(tokenizer)
    margins = [beta * ((pc - rc) - (pr - rr)) for (pc, pr), (rc, rr) in
               zip(reference_logps(policy, rows, pad), reference_logps(reference, rows, pad))]
    return {"accuracy": sum(m > 0 for m in margins) / len(margins), "margin": sum(margins) / len(margins),
            "pairs": len(margins)}
