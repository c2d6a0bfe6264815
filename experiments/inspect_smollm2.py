"""llmlab.inspect on SmolLM2-135M: attention, logit lens vs a tuned lens (held-out KL), causal tracing of a fact,
a steering sweep and input attribution, written to experiments/results/inspect_smollm2/.

    python experiments/inspect_smollm2.py [--tuned-steps 40] [--out DIR]
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import write_results  # noqa: E402

import llmlab  # noqa: E402
from llmlab.data.pystdlib import iter_stdlib_documents  # noqa: E402
from llmlab.inspect import reports  # noqa: E402

POSITIVE = ["I love this. It is wonderful", "This is great, I like it", "What a delightful, happy day"]
NEGATIVE = ["I hate this. It is awful", "This is terrible, I dislike it", "What a miserable, sad day"]


def stdlib_texts(n: int, chars: int = 400) -> list[str]:
    """Short English passages: the first docstrings of the running Python's standard library."""
    docs = iter_stdlib_documents(sources=False, docstrings=True)
    texts = (d.text[:chars] for d in docs if len(d.text) > 200)
    return list(itertools.islice(texts, n))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="experiments/results/inspect_smollm2")
    ap.add_argument("--tuned-steps", type=int, default=0)
    ap.add_argument("--texts", type=int, default=40)
    args = ap.parse_args()
    out = Path(args.out)
    torch.set_num_threads(1)
    llm = llmlab.load("smollm2", dtype=torch.float32)
    rows = []
    rows.append({"tool": "attention", **reports.attention_report(llm, "The capital of France is Paris. The capital "
                                                                 "of Italy is", out / "attention", [0, 5, 15, 29])})
    rows.append({"tool": "trace", **reports.trace_report(llm, "The Eiffel Tower is in the city of",
                                                         "Eiffel Tower", " Paris", out / "trace", samples=3)})
    rows.append({"tool": "attribute", **reports.attribute_report(llm, "The capital of France is", " Paris",
                                                                 out / "attribute")})
    steer = reports.steer_report(llm, "I think the movie was", POSITIVE, NEGATIVE, 10, [-4.0, -2.0, 0.0, 2.0, 4.0],
                                 [" great", " terrible"], out / "steer", max_new_tokens=12)
    rows.append({"tool": "steer", **steer})
    # the tuned lens trains 30 translators through a 49k-word head: minutes per step on a loaded 2-core machine,
    # so it is opt-in here (--tuned-steps N); the bios experiment trains one on a small vocabulary
    texts = stdlib_texts(args.texts) if args.tuned_steps else None
    lens = reports.lens_report(llm, "The capital of France is", out / "lens", texts, args.tuned_steps)
    rows.append({"tool": "lens", **lens})
    write_results(out, "summary", [{k: str(v) for k, v in r.items()} for r in rows],
                  "llmlab.inspect on SmolLM2-135M-Instruct (fp32); per tool, the headline numbers; details in "
                  "each tool's JSON and PNG.")
    print((out / "summary.md").read_text())


if __name__ == "__main__":
    main()
