"""The Python standard library corpus: real source files and their docstrings, test suites skipped."""

import json
import json.decoder
from pathlib import Path

from llmlab.data.pystdlib import iter_stdlib_documents, stdlib_dir, write_pystdlib


def test_json_package_sources_and_docstrings():
    root = stdlib_dir()
    docs = list(iter_stdlib_documents(root=root / "json"))
    by_source = {d.source: d.text for d in docs}
    init = Path(json.__file__)
    assert by_source["stdlib:__init__.py"] == init.read_text(encoding="utf-8")
    doc = by_source["stdlib-doc:decoder.py"]
    assert json.decoder.__doc__.strip() in doc
    assert "decoder.JSONDecoder.decode" in doc and json.decoder.JSONDecoder.decode.__doc__.split("\n")[0] in doc


def test_stream_skips_test_suites():
    docs = list(iter_stdlib_documents(root=stdlib_dir() / "unittest"))
    assert docs and all("/test/" not in d.source and not d.source.split(":")[1].startswith("test/") for d in docs)
    assert any(d.source == "stdlib:case.py" for d in docs)
    # the default root is the running interpreter's stdlib; a few documents are enough to see it is real
    first = next(iter_stdlib_documents(docstrings=False))
    assert first.source.startswith("stdlib:") and first.text.strip()


def test_write_jsonl(tmp_path):
    n = write_pystdlib(tmp_path / "std.jsonl", root=stdlib_dir() / "json")
    rows = [json.loads(l) for l in (tmp_path / "std.jsonl").read_text(encoding="utf-8").splitlines()]
    assert n == len(rows) > 5
    assert {"text", "source"} <= set(rows[0])
