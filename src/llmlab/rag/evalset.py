"""A retrieval eval set that needs no download: the bios world's biographies and questions about them.

Two kinds of question, with the person's biography as the relevant document (and gold "answers" for answer
correctness: the attribute's value, or the names of the people who match):
  "name":      the world's own QA questions ("Which university did Clara Dale Pemberton study at?"): the name
               is in the question, so word overlap should find it; dense vectors blur similar names.
  "attribute": who-questions without a name, in words other than the biography's ("Which person was born in
               Sioux Falls, SD and was employed by Ironbridge Construction?"); every person matching both
               facts is relevant.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from llmlab.data.bios import make_bios_world
from llmlab.io import new_temp_dir, replace_dir

ATTRIBUTE_QUESTIONS = {
    ("birth_city", "employer"): "Which person was born in {birth_city} and was employed by {employer}?",
    ("university", "major"): "Who studied {major} at {university}?",
    ("birth_date", "employer_city"): "Who was born on {birth_date} and had a job in {employer_city}?",
}


def bios_evalset(n_people: int = 300, seed: int = 0, name_questions: int = 1,
                 attribute_questions: int = 1) -> tuple[list[dict], list[dict]]:
    """(documents, questions): one biography per person (id = the person's name), and per person
    `name_questions` QA questions plus `attribute_questions` who-questions, drawn with a seeded RNG."""
    world = make_bios_world(n_people, seed=seed)
    documents = [{"id": p.name, "text": bio} for p, bio in zip(world.people, world.biographies())]
    rng = random.Random(f"{seed}/rag-eval")
    questions = []
    qa_by_person: dict[str, list[dict]] = {}
    for qa in world.qa("all"):
        qa_by_person.setdefault(qa["person"], []).append(qa)
    for person in world.people:
        for qa in rng.sample(qa_by_person[person.name], name_questions):
            questions.append({"question": qa["question"], "relevant": [person.name], "kind": "name",
                              "answers": [qa["answer"]]})
        for attrs in rng.sample(sorted(ATTRIBUTE_QUESTIONS), attribute_questions):
            facts = {a: getattr(person, a) for a in attrs}
            relevant = [p.name for p in world.people if all(getattr(p, a) == v for a, v in facts.items())]
            questions.append({"question": ATTRIBUTE_QUESTIONS[attrs].format(**facts), "relevant": relevant,
                              "kind": "attribute", "answers": relevant})
    return documents, questions


def write_bios_evalset(out: str | Path, n_people: int = 300, seed: int = 0) -> Path:
    """corpus/biographies.jsonl and questions.jsonl in `out` (replaced atomically)."""
    documents, questions = bios_evalset(n_people, seed)
    out = Path(out)
    tmp = new_temp_dir(out)
    (tmp / "corpus").mkdir()
    with open(tmp / "corpus" / "biographies.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(d, ensure_ascii=False) + "\n" for d in documents)
    with open(tmp / "questions.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(q, ensure_ascii=False) + "\n" for q in questions)
    replace_dir(tmp, out)
    return out
