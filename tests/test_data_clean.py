"""The corpus pipeline: ingest, normalization, each filter, boilerplate, dedup, bad input, report."""

import json

import pytest

from llmlab.data.clean import CleanConfig, clean_corpus, clean_text
from llmlab.data.dedup import NearDedup
from llmlab.data.filters import Blocklist, FilterConfig, check_document, quality_score
from llmlab.data.ingest import read_documents
from llmlab.errors import LLMLabError

RIVER = ("The river town woke slowly on winter mornings. Fishermen checked their nets before dawn, and the baker "
         "opened her shop when the first light touched the church tower. Children walked to school along the "
         "frozen canal, arguing about which of them had seen the heron first. By noon the market square was "
         "crowded with farmers selling apples, cheese and firewood to anyone who would stop and listen to their stories.")
TELESCOPE = ("Modern telescopes collect light with mirrors that are several meters across. Astronomers use them to "
             "study distant galaxies, measure the expansion of the universe, and search for planets around other "
             "stars. Because the atmosphere blurs images, many observatories are built on high mountains where the "
             "air is thin and dry. Some instruments even fly in space, far above the clouds and the glow of cities.")
SOUP = ("Learning to cook is mostly a matter of patience. A good soup begins with onions softened slowly in butter, "
        "then carrots, celery and a handful of herbs from the garden. Taste often, add salt with care, and let the "
        "pot simmer until the kitchen smells warm and sweet. Friends who arrive hungry will forgive a cracked bowl "
        "but never a bland dinner, and they will talk about that evening for years.")
LIBRARY = ("The committee met on Tuesday to review the budget for the new library. Members agreed that the reading "
           "room needed better lighting and that the children's section should move closer to the garden entrance. "
           "After a long discussion about parking, they voted to ask the city for a small grant and to publish the "
           "plans so that residents could comment before the summer.")
PROSE = [RIVER, TELESCOPE, SOUP, LIBRARY]

CFG = FilterConfig(min_words=50)
DEFAULT_BLOCKLIST = Blocklist.load(None)


def reason(text, cfg=CFG, blocklist=DEFAULT_BLOCKLIST):
    r = check_document(text, cfg, blocklist)
    return None if r is None else r[0]


def write_jsonl(path, texts, field="text"):
    path.write_text("".join(json.dumps({field: t}) + "\n" for t in texts), encoding="utf-8")
    return path


def read_out(path):
    return [json.loads(l)["text"] for l in path.read_text(encoding="utf-8").splitlines()]


# ----------------------------------------------------------------------------- filters

@pytest.mark.parametrize("text", PROSE)
def test_ordinary_prose_passes_every_filter(text):
    assert reason(text) is None


def test_length_bounds():
    assert reason("A short note about the weather and the sea.") == "too_short"
    assert reason(RIVER, FilterConfig(min_words=5, max_words=30)) == "too_long"


def test_symbol_ratio():
    tagged = RIVER + " " + " ".join(f"#tag{i}" for i in range(12))
    assert reason(tagged) == "symbol_ratio"
    assert reason(RIVER + " #winter") is None


def test_bullet_and_ellipsis_lines():
    bullets = "\n".join(f"- the {w} item of the list that we have with care" for w in
                        "first second third fourth fifth sixth seventh eighth".split())
    assert reason(bullets) == "bullet_lines"
    trailing = "\n".join(f"The story of the {w} day and what happened to the town ..." for w in
                         "first second third fourth fifth sixth".split()) + "\n" + RIVER
    assert reason(trailing) in ("ellipsis_lines", "symbol_ratio")
    assert reason(trailing, FilterConfig(min_words=50, max_symbol_word_ratio=1.0)) == "ellipsis_lines"


def test_duplicate_lines():
    spam = "Subscribe to our newsletter to get the best deals of the week."
    lines = [RIVER, spam, TELESCOPE, spam, SOUP, spam, spam]
    assert reason("\n".join(lines)) == "dup_lines"


def test_top_ngram():
    items = "shoes bags hats belts socks coats gloves scarves boots shirts jackets ties watches rings caps".split()
    text = " ".join(f"buy cheap {it} today" for it in items) + " with the best prices of the year"
    assert reason(text) == "top_ngram"


def test_duplicate_ngrams():
    # the same paragraph twice on one line: no repeated line, but half the 5-grams are repeats
    assert reason(SOUP + " " + SOUP) == "dup_ngram"


def test_blocklist_default_and_custom(tmp_path):
    assert reason(RIVER + " Buy Viagra now.") == "blocklist"
    custom = tmp_path / "block.txt"
    custom.write_text("# comment\nheron\nass\n", encoding="utf-8")
    bl = Blocklist.load(custom)
    assert reason(RIVER, blocklist=bl) == "blocklist"  # "heron"
    assert reason(TELESCOPE + " The class was assigned.", blocklist=bl) is None  # whole words only
    with pytest.raises(LLMLabError, match="nope.txt"):
        Blocklist.load(tmp_path / "nope.txt")


def test_quality_score():
    numbers = " ".join(str(1000 + 37 * i) for i in range(60))
    assert reason(numbers) == "low_quality"
    adjectives = "red green ripe sweet small fresh dark wild".split()
    nouns = "apples hills rivers plums stones birds clouds roads".split()
    no_stop_words = ", ".join(f"{a} {n}" for n in nouns for a in adjectives)
    assert reason(no_stop_words) == "low_quality"
    assert reason(no_stop_words + ", and all of the rest") is None
    score, detail = quality_score("x y z q w the and".split())  # mean word length 1.6 < 3
    assert score < 0.6 and "mean word length 1.6" in detail
    score, _ = quality_score("the cat slept with the old dog and was happy".split())
    assert score == 1.0


# ----------------------------------------------------------------------------- normalization

def test_clean_text():
    assert clean_text("cafe\u0301") == "café"  # NFC composes
    assert clean_text("\ufb01ne", "NFKC") == "fine" and clean_text("\ufb01ne", "NFC") == "\ufb01ne"
    assert clean_text("a\u200bb\x00c\x07d\ufeff") == "abcd"  # zero-width, NUL, BEL, BOM
    assert clean_text("one  two\u00a0\u00a0three   \r\n\r\n\r\n\r\nfour\t") == "one two three\n\nfour"
    assert clean_text("def f():\n    return 1\n") == "def f():\n    return 1"  # indentation is kept


def test_html_ingest(tmp_path):
    (tmp_path / "page.html").write_text(
        "<html><head><title>T</title><style>p {color: red}</style></head><body><p>Hello &amp; welcome.</p>"
        "<script>var x = 1;</script><div>Second line</div></body></html>", encoding="utf-8")
    (doc,) = read_documents(tmp_path)
    assert doc.text == "Hello & welcome.\nSecond line"


# ----------------------------------------------------------------------------- pipeline

def small_config(**kw):
    return CleanConfig(filters=FilterConfig(min_words=20), **kw)


def test_boilerplate_lines_dropped(tmp_path):
    header, footer = "Home | About | Contact", "Copyright 2024 Example Corp. All rights reserved."
    src = tmp_path / "site"
    src.mkdir()
    for i, p in enumerate(PROSE):
        (src / f"page{i}.md").write_text(f"{header}\n\n{p}\n\n{footer}\n", encoding="utf-8")
    out = tmp_path / "out.jsonl"
    report = clean_corpus([src], out, small_config())
    assert read_out(out) == PROSE
    assert report.boilerplate_lines_dropped == 2 * len(PROSE)
    # a line shared by fewer documents than the threshold stays
    report = clean_corpus([src], out, small_config(boilerplate_min_docs=len(PROSE) + 1))
    assert all(t.startswith(header) and t.endswith(footer) for t in read_out(out))


def test_exact_and_near_dedup(tmp_path):
    changed = (TELESCOPE.replace("several", "many").replace("distant", "faraway").replace("dry", "cold"))
    assert changed != TELESCOPE
    docs = [RIVER, "  " + RIVER.upper().replace(" ", "   "), TELESCOPE, SOUP, changed, LIBRARY]
    inp = write_jsonl(tmp_path / "in.jsonl", docs)
    out = tmp_path / "out.jsonl"
    report = clean_corpus(inp, out, small_config())
    assert read_out(out) == [RIVER, TELESCOPE, SOUP, LIBRARY]
    assert report.removed["exact_duplicate"]["docs"] == 1
    assert report.removed["near_duplicate"]["docs"] == 1
    assert f"{inp}:3" in report.removed["near_duplicate"]["examples"][0]["detail"]


def test_near_dedup_threshold():
    nd = NearDedup(threshold=0.8)
    assert nd.check(RIVER, "a") is None
    assert nd.check(TELESCOPE, "b") is None
    assert nd.check(RIVER.replace("winter", "summer"), "c") == "a"
    with pytest.raises(LLMLabError, match="threshold 0.995"):
        NearDedup(threshold=0.995)
    strict = NearDedup(threshold=0.97)
    assert strict.check(RIVER, "a") is None
    assert strict.check(RIVER.replace("winter", "summer").replace("heron", "crane").replace("apples", "pears"),
                        "c") is None


def test_jsonl_errors_and_skip_bad(tmp_path):
    inp = tmp_path / "bad.jsonl"
    inp.write_text(json.dumps({"content": RIVER}) + "\n{not json\n" + json.dumps({"body": "x"}) + "\n"
                   + json.dumps({"content": TELESCOPE}) + "\n", encoding="utf-8")
    out = tmp_path / "out.jsonl"
    with pytest.raises(LLMLabError, match=r"bad\.jsonl:2: line is not valid JSON"):
        clean_corpus(inp, out, small_config(text_field="content"))
    with pytest.raises(LLMLabError, match=r"bad\.jsonl:1: line has no 'text' field"):
        clean_corpus(inp, out, small_config())
    assert not out.exists()
    report = clean_corpus(inp, out, small_config(text_field="content", skip_bad=True))
    assert read_out(out) == [RIVER, TELESCOPE]
    assert report.bad_lines_skipped == 2
    assert any("bad.jsonl:3" in m for m in report.bad_input_examples)


def test_empty_corpus_and_all_removed(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "out.jsonl"
    with pytest.raises(LLMLabError, match="empty corpus"):
        clean_corpus(empty, out, small_config())
    write_jsonl(tmp_path / "short.jsonl", ["too short", "also short"])
    with pytest.raises(LLMLabError, match="all 2 documents were removed"):
        clean_corpus(tmp_path / "short.jsonl", out, small_config())
    assert not out.exists()


def test_unreadable_and_missing_files(tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9 au lait".encode("latin-1"))
    out = tmp_path / "out.jsonl"
    with pytest.raises(LLMLabError, match="cannot read .*latin1.txt"):
        clean_corpus(bad, out, small_config())
    with pytest.raises(LLMLabError, match="missing.txt: no such file"):
        clean_corpus(tmp_path / "missing.txt", out, small_config())
    (tmp_path / "good.txt").write_text(RIVER, encoding="utf-8")
    report = clean_corpus(tmp_path, out, small_config(skip_bad=True))
    assert report.unreadable_files_skipped == 1 and read_out(out) == [RIVER]


def test_report_counts_and_files(tmp_path):
    docs = PROSE + [RIVER, "tiny doc", RIVER + " Buy Viagra today."]
    inp = write_jsonl(tmp_path / "in.jsonl", docs)
    report = clean_corpus(inp, tmp_path / "out.jsonl", small_config(), report_dir=tmp_path / "rep")
    data = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert data["docs_in"] == len(docs) and data["docs_kept"] == len(PROSE)
    assert data["docs_kept"] + sum(r["docs"] for r in data["removed"].values()) == data["docs_in"]
    assert set(data["removed"]) == {"exact_duplicate", "too_short", "blocklist"}
    assert data["bytes_in"] == sum(len(d.encode()) for d in docs)
    assert data["removed"]["too_short"]["examples"][0]["text"] == "tiny doc"
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "## blocklist" in md and "| kept | 4" in md
    assert report.summary().startswith(f"{len(docs)} documents in")
