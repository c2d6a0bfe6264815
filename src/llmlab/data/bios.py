"""A synthetic world of fictional people with biographies and QA pairs (the bioS world of Physics of LMs, Part 3.1).

Allen-Zhu and Li pretrain on biographies of every person, finetune on question/answer pairs for half of the
people, and test QA on the other half: the model can answer for held-out people only if pretraining stored
their facts in an extractable way, which the knowledge augmentations (several differently worded biographies
per person, shuffled sentences, full names instead of pronouns) turn out to make possible.
"""

from __future__ import annotations

import calendar
import json
import random
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from llmlab.errors import LLMLabError
from llmlab.io import new_temp_dir, replace_dir

FEMALE_NAMES = """Anya Celia Elsa Greta Iris Kira Mira Opal Rosa Talia Vera Xenia Zelda Bianca Daria Fiona Hazel Juno
Lena Nadia Petra Sabine Una Wren Yara Alma Clara Edith Gwen Ingrid Kaia Maren Odette Rhea Tessa Valerie Ysolde Zora""".split()
MALE_NAMES = """Bram Dorian Felix Hugo Jasper Leon Nolan Pierce Quinn Silas Ulric Wade Yuri Zane Abel Caspar Emil Gideon
Ivo Kaspar Magnus Oskar Rufus Tobias Viktor Boris Dmitri Florian Harvey Jonas Lucian Nico Pavel Stellan Ugo Willem""".split()
MIDDLE_NAMES = """Briar Cove Dale Ember Fern Glen Heath Isle Jade Lark Moss North Oak Pike Quill Reed Sage Thorne
Vale West Ash Brook Clay Dune Flint Grove Haven Ivy Jett Kestrel Linden Marsh Onyx Pearl Rain Shale Tide Umber Wilde
Yarrow Alder Birch Cedar Drake Elm Frost Gale Hollis Indigo Juniper""".split()
LAST_NAMES = """Forger Ashdown Blackwood Carver Dunmore Everly Fairbanks Galloway Hartwell Ingram Jessup Kingsley
Lockhart Merriweather Northcott Oakley Pemberton Quimby Ravenscroft Sterling Thackeray Underhill Vance Whitlock
Yardley Zimmer Abernathy Beaumont Calloway Drummond Ellsworth Fenwick Gladstone Holloway Irving Jarrett Kensington
Langley Montague Newbury Ormsby Prescott Radcliffe Sinclair Templeton Upton Vickers Wainwright Winslow Yates
Ashcombe Bellamy Cromwell Davenport Eastwood Fitzroy Granger Huxley Kendrick Lowell Marlowe""".split()
CITIES = """Princeton, NJ|Boise, ID|Savannah, GA|Duluth, MN|Tucson, AZ|Burlington, VT|Eugene, OR|Madison, WI|Asheville, NC
|Santa Fe, NM|Ithaca, NY|Bozeman, MT|Charleston, SC|Ann Arbor, MI|Boulder, CO|Provo, UT|Lexington, KY|Spokane, WA
|Tallahassee, FL|Anchorage, AK|Portland, ME|Lincoln, NE|Fargo, ND|Reno, NV|Little Rock, AR|Mobile, AL|Dover, DE
|Honolulu, HI|Wichita, KS|Baton Rouge, LA|Sioux Falls, SD|Cheyenne, WY|Providence, RI|Columbia, MO|Albany, NY
|Flagstaff, AZ|Galveston, TX|Hartford, CT|Jackson, MS|Knoxville, TN""".replace("\n", "").split("|")
UNIVERSITIES = """Massachusetts Institute of Technology|Stanford University|University of Michigan|Rice University
|Carnegie Mellon University|University of Chicago|Cornell University|Duke University|University of Washington
|Georgia Institute of Technology|University of Texas at Austin|Brown University|Johns Hopkins University
|University of Wisconsin-Madison|Purdue University|Vanderbilt University|Northwestern University|Tufts University
|University of Virginia|Emory University|Ohio State University|University of Minnesota|Boston University
|Dartmouth College|Pennsylvania State University""".replace("\n", "").split("|")
MAJORS = """Communications|Computer Science|Mechanical Engineering|Biology|History|Economics|Mathematics|Physics
|Chemistry|Philosophy|Psychology|Linguistics|Architecture|Nursing|Political Science|Music|Statistics|Geology
|Sociology|Civil Engineering|Art History|Marine Biology|Anthropology|Accounting|Journalism""".replace("\n", "").split("|")
# an employer determines the employer city (its headquarters), as in the paper
EMPLOYERS = {
    "Meta Platforms": "Menlo Park, CA", "Bluepeak Robotics": "Pittsburgh, PA", "Northwind Analytics": "Seattle, WA",
    "Copperleaf Foods": "Omaha, NE", "Larkspur Pharmaceuticals": "Cambridge, MA", "Granite Harbor Bank": "Charlotte, NC",
    "Silverline Airlines": "Dallas, TX", "Redwood Energy": "Houston, TX", "Quillon Publishing": "New York, NY",
    "Tidewater Shipping": "Norfolk, VA", "Helix Genomics": "San Diego, CA", "Summit Outdoor Gear": "Denver, CO",
    "Brightwave Media": "Los Angeles, CA", "Ironbridge Construction": "Chicago, IL", "Cobalt Semiconductors": "Austin, TX",
    "Maple Crest Insurance": "Hartford, CT", "Evergreen Health": "Minneapolis, MN", "Orchid Cosmetics": "Miami, FL",
    "Pinecone Software": "Salt Lake City, UT", "Stonegate Motors": "Detroit, MI", "Harborview Hotels": "Las Vegas, NV",
    "Aurora Telecom": "Atlanta, GA", "Keystone Steel": "Cleveland, OH", "Willow Lane Toys": "Providence, RI",
}

ATTRIBUTES = ("birth_date", "birth_city", "university", "major", "employer", "employer_city")

# Several ways to state each attribute; {name} is the full name or a pronoun ({Name} when it starts a sentence).
TEMPLATES = {
    "birth_date": [
        "{Name} was born on {birth_date}.",
        "{Name} came into this world on {birth_date}.",
        "{Poss} birthday is {birth_date}.",
        "{Name} celebrates {poss} birthday on {birth_date}.",
        "{Name} arrived on {birth_date}.",
        "{Poss} date of birth is {birth_date}.",
    ],
    "birth_city": [
        "{Name} was born in {birth_city}.",
        "{Name} spent {poss} early years in {birth_city}.",
        "{Name} was brought up in {birth_city}.",
        "{Poss} hometown is {birth_city}.",
        "{Name} grew up in {birth_city}.",
        "{Poss} place of birth is {birth_city}.",
    ],
    "university": [
        "{Name} received mentorship and guidance from faculty members at {university}.",
        "{Name} graduated from {university}.",
        "{Name} studied at {university}.",
        "{Name} completed {poss} degree at {university}.",
        "{Name} attended {university}.",
        "{Poss} alma mater is {university}.",
    ],
    "major": [
        "{Name} completed {poss} education with a focus on {major}.",
        "{Name} majored in {major}.",
        "{Poss} field of study was {major}.",
        "{Name} earned a degree in {major}.",
        "{Name} specialized in {major}.",
        "At university, {name} studied {major}.",
    ],
    "employer": [
        "{Name} had a professional role at {employer}.",
        "{Name} worked for {employer}.",
        "{Name} was employed by {employer}.",
        "{Name} built a career at {employer}.",
        "{Poss} employer was {employer}.",
        "{Name} joined the staff of {employer}.",
    ],
    "employer_city": [
        "{Name} was employed in {employer_city}.",
        "{Name} worked in {employer_city}.",
        "{Poss} office was in {employer_city}.",
        "{Name} commuted to work in {employer_city}.",
        "{Name} spent {poss} working years in {employer_city}.",
        "{Poss} workplace was in {employer_city}.",
    ],
}

QUESTIONS = {
    "birth_date": "What is the birth date of {name}?",
    "birth_city": "What is the birth city of {name}?",
    "university": "Which university did {name} study at?",
    "major": "What major did {name} study?",
    "employer": "Which company did {name} work for?",
    "employer_city": "Where did {name} work?",
}

AUGMENTATIONS = ("multi", "permute", "fullname")

# A chat template that renders QA as plain text, the way Physics of LMs 3.1 finetunes on it:
# "<|endoftext|>What is the birth city of Anya Briar Forger? Princeton, NJ<|endoftext|>". A biography also starts
# after <|endoftext|> and ends with one, so every token is one pretraining has seen and SFT only learns the mapping
# from question to answer. A ChatML frame adds tokens pretraining never saw, whose huge initial loss (~14 nats)
# makes the first SFT steps overwrite the stored knowledge instead (experiments/knowledge_extraction.py).
QA_CHAT_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'assistant' %}{{ ' ' + m['content'] + eos_token }}"
                    "{% else %}{{ eos_token + m['content'] }}{% endif %}{% endfor %}")


@dataclass
class Person:
    name: str
    pronoun: str  # "he" or "she"
    birth_date: str
    birth_city: str
    university: str
    major: str
    employer: str
    employer_city: str
    split: str  # "train" or "test"


def _render(person: Person, order: list[str], choice: dict[str, int], fullname: bool) -> str:
    poss = "his" if person.pronoun == "he" else "her"
    sentences = []
    for i, attr in enumerate(order):
        template = TEMPLATES[attr][choice[attr] % len(TEMPLATES[attr])]
        # the first sentence always names the person, so a shuffled biography is never ambiguous
        use_name = fullname or i == 0
        subj = person.name if use_name else person.pronoun
        possessive = f"{person.name}'s" if use_name else poss
        fields = {a: getattr(person, a) for a in ATTRIBUTES}
        s = template.format(name=subj, Name=subj[0].upper() + subj[1:], poss=poss,
                            Poss=possessive[0].upper() + possessive[1:], **fields)
        sentences.append(s)
    return " ".join(sentences)


def parse_augment(augment: str | Iterable[str] | None) -> set[str]:
    if augment is None:
        return set()
    items = augment.split(",") if isinstance(augment, str) else list(augment)
    out = {a.strip() for a in items if a.strip() and a.strip() != "none"}
    unknown = out - set(AUGMENTATIONS)
    if unknown:
        raise LLMLabError(f"unknown bios augmentation {sorted(unknown)[0]!r} (choose from {', '.join(AUGMENTATIONS)})")
    return out


class World:
    """N fictional people with unique full names; biographies and QA are pure functions of (people, seed)."""

    def __init__(self, people: list[Person], seed: int):
        self.people, self.seed = people, seed

    def biographies(self, augment: str | Iterable[str] | None = None, multi: int = 5) -> Iterator[str]:
        """Biographies, person by person. augment: any of "multi" (`multi` differently worded biographies per
        person), "permute" (shuffled sentence order), "fullname" (the full name instead of pronouns)."""
        aug = parse_augment(augment)
        copies = multi if "multi" in aug else 1
        if copies > len(TEMPLATES["birth_date"]):
            raise LLMLabError(f"multi={copies} biographies per person, but only {len(TEMPLATES['birth_date'])} templates")
        for idx, person in enumerate(self.people):
            rng = random.Random(f"{self.seed}/bio/{idx}")
            base = {a: rng.randrange(len(TEMPLATES[a])) for a in ATTRIBUTES}
            for k in range(copies):
                # copy k shifts every template choice by k, so the copies of one person are all worded differently
                choice = {a: base[a] + k for a in ATTRIBUTES}
                order = list(ATTRIBUTES)
                if "permute" in aug:
                    rng.shuffle(order)
                yield _render(person, order, choice, "fullname" in aug)

    def qa(self, split: str = "train") -> list[dict]:
        if split not in ("train", "test", "all"):
            raise LLMLabError(f"unknown QA split {split!r} (train, test or all)")
        return [{"question": QUESTIONS[a].format(name=p.name), "answer": getattr(p, a), "person": p.name,
                 "attribute": a}
                for p in self.people if split == "all" or p.split == split for a in ATTRIBUTES]

    def other_value(self, attribute: str, value: str, rng: random.Random) -> str:
        """Another person's value of the same attribute: a wrong answer of the right kind (only knowing the
        person tells it from the right one)."""
        others = sorted({getattr(p, attribute) for p in self.people} - {value})
        if not others:
            raise LLMLabError(f"every person has the same {attribute}; there is no wrong answer of its kind")
        return rng.choice(others)

    def write(self, out_dir: str | Path, augment: str | Iterable[str] | None = None, multi: int = 5) -> Path:
        """biographies.jsonl, qa_train.jsonl, qa_test.jsonl, people.jsonl in `out_dir` (replaced atomically)."""
        out_dir = Path(out_dir)
        tmp = new_temp_dir(out_dir)
        aug = parse_augment(augment)
        copies = multi if "multi" in aug else 1
        with open(tmp / "biographies.jsonl", "w", encoding="utf-8") as f:
            for i, bio in enumerate(self.biographies(aug, multi)):
                f.write(json.dumps({"text": bio, "person": self.people[i // copies].name}, ensure_ascii=False) + "\n")
        for split in ("train", "test"):
            with open(tmp / f"qa_{split}.jsonl", "w", encoding="utf-8") as f:
                for r in self.qa(split):
                    f.write(json.dumps(r, ensure_ascii=False) + "\n")
        with open(tmp / "people.jsonl", "w", encoding="utf-8") as f:
            for p in self.people:
                f.write(json.dumps(asdict(p), ensure_ascii=False) + "\n")
        replace_dir(tmp, out_dir)
        return out_dir


def make_bios_world(n_people: int, seed: int = 0, test_fraction: float = 0.5) -> World:
    """Sample `n_people` people with a seeded RNG; a `test_fraction` of them is held out from QA finetuning."""
    n_names = (len(FEMALE_NAMES) + len(MALE_NAMES)) * len(MIDDLE_NAMES) * len(LAST_NAMES)
    if n_people < 1:
        raise LLMLabError(f"bios world needs at least 1 person, got {n_people}")
    if n_people > n_names // 2:
        raise LLMLabError(f"bios world supports at most {n_names // 2} people, got {n_people}")
    if not 0.0 <= test_fraction < 1.0:
        raise LLMLabError(f"test fraction must be in [0, 1), got {test_fraction}")
    rng = random.Random(seed)
    names: set[str] = set()
    people = []
    employers = sorted(EMPLOYERS)
    while len(people) < n_people:
        pronoun = rng.choice(("he", "she"))
        first = rng.choice(MALE_NAMES if pronoun == "he" else FEMALE_NAMES)
        name = f"{first} {rng.choice(MIDDLE_NAMES)} {rng.choice(LAST_NAMES)}"
        if name in names:  # full names are unique, so a question names exactly one person
            continue
        names.add(name)
        year, month = rng.randint(1950, 2005), rng.randint(1, 12)
        day = rng.randint(1, calendar.monthrange(year, month)[1])
        employer = rng.choice(employers)
        people.append(Person(
            name=name, pronoun=pronoun,
            birth_date=f"{calendar.month_name[month]} {day}, {year}",
            birth_city=rng.choice(CITIES), university=rng.choice(UNIVERSITIES), major=rng.choice(MAJORS),
            employer=employer, employer_city=EMPLOYERS[employer], split="train"))
    n_test = round(test_fraction * n_people)
    for i in rng.sample(range(n_people), n_test):
        people[i].split = "test"
    return World(people, seed)
