"""llmlab.inspect on a small model trained on the bios world: where is a person's birth city (causal tracing,
averaged over people), what do the layers encode (probes with control tasks), and the tuned vs the logit lens.

    python experiments/inspect_bios.py [--people 48] [--steps 300] [--layers 4] [--name-pool 7] [--out DIR]

--name-pool N names the people "First Last" from N first names per gender and N last names, so that no one token
of a name says who it is (0: the bios world's own unique three-part names).
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import write_results  # noqa: E402

from llmlab.inspect import causal_trace, train_tuned_lens  # noqa: E402
from llmlab.inspect import plots  # noqa: E402
from llmlab.inspect.bios_model import answer_id, fact_prompt, train_bios_model  # noqa: E402
from llmlab.inspect.probe import birth_year_bucket, probe_name_mentions  # noqa: E402


def mean_trace(bios, n_people: int, samples: int) -> tuple[torch.Tensor, list[str]]:
    """Indirect effect averaged over people, positions aligned as ROME does: the subject's first, middle and
    last tokens, then the relation's tokens (" was born in")."""
    rows = []
    for p in bios.world.people[:n_people]:
        ids, subject = fact_prompt(bios.tokenizer, p.name)
        effect = causal_trace(bios.model, ids, list(subject), answer_id(bios.tokenizer, p.birth_city),
                              samples=samples).effect
        middle = effect[:, subject[1:-1]].mean(-1) if len(subject) > 2 else torch.zeros(effect.shape[0])
        after = [effect[:, t] for t in range(subject[-1] + 1, len(ids))]
        rows.append(torch.stack([effect[:, 0], effect[:, subject[0]], middle, effect[:, subject[-1]], *after]))
    labels = ["<eos>", "subject first", "subject middle", "subject last", " was", " born", " in"]
    return torch.stack(rows).mean(0), labels


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--people", type=int, default=48)
    ap.add_argument("--name-pool", type=int, default=7)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--trace-people", type=int, default=16)
    ap.add_argument("--out", default="experiments/results/inspect_bios")
    args = ap.parse_args()
    out = Path(args.out)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        bios = train_bios_model(tmp, people=args.people, steps=args.steps, layers=args.layers,
                                name_pool=args.name_pool)
    effect, labels = mean_trace(bios, args.trace_people, samples=8)
    states = [f"{i}" if i else "emb" for i in range(effect.shape[1])]
    plots.heatmap(out / "trace.png", effect.numpy(), states, labels,
                  f"causal tracing, birth city, mean over {args.trace_people} people: P(answer) restored",
                  "residual state", "position")
    trace_rows = [{"position": l, **{f"state {s}": round(v, 4) for s, v in zip(states, row.tolist())}}
                  for l, row in zip(labels, effect)]
    write_results(out, "trace", trace_rows, "Indirect effect (P(answer) with one state restored minus corrupted) "
                  f"averaged over {args.trace_people} people; rows are positions, columns residual states.")
    probe_rows = []
    people = bios.world.people
    hidden = [random.Random(f"hidden/{i}").randrange(2) for i in range(len(people))]  # never in any text
    properties = {"pronoun": [p.pronoun for p in people],
                  "birth decade": [birth_year_bucket(p.birth_date, 20) for p in people],
                  "birth city": [p.birth_city for p in people], "hidden bit (not in the text)": hidden}
    for attribute, labels_ in properties.items():
        r = probe_name_mentions(bios.model, bios.tokenizer, bios.world, labels_, seed=0)
        probe_rows += [{"property": attribute, "state": l, "accuracy": a, "control": c, "selectivity": a - c,
                        "majority": r.majority, "n_test": r.n_test} for l, a, c in zip(r.layers, r.accuracy,
                                                                                       r.control_accuracy)]
        plots.lines(out / f"probe_{attribute.split()[0]}.png", r.layers,
                    {"task": r.accuracy, "control": r.control_accuracy},
                    f"probe at the name's last token: {attribute}", "residual state", "held-out accuracy",
                    hline=r.majority)
    write_results(out, "probes", probe_rows, "Linear probes at the last token of every mention of a person's name "
                  "in their biographies, scored on held-out people (half of them); control = a random label per "
                  "token type (Hewitt & Liang 2019), selectivity = accuracy - control.")
    texts = list(bios.world.biographies("multi"))
    enc = [[bios.tokenizer.eos_token_id] + bios.tokenizer.encode(t) for t in texts]
    lens = train_tuned_lens(bios.model, enc[:-100], enc[-100:], steps=200, lr=3e-3)
    write_results(out, "lens", [{"state": i, "kl_logit_lens": a, "kl_tuned_lens": b} for i, (a, b) in
                                enumerate(zip(lens.heldout_kl_logit_lens, lens.heldout_kl_tuned_lens))],
                  f"Held-out KL(final || lens), nats/token, {lens.heldout_tokens} held-out tokens (other people's "
                  "biographies).")
    plots.lines(out / "lens_kl.png", list(range(len(lens.heldout_kl_logit_lens))),
                {"logit lens": lens.heldout_kl_logit_lens, "tuned lens": lens.heldout_kl_tuned_lens},
                "held-out KL to the final distribution", "residual state", "nats per token")
    print((out / "trace.md").read_text(), (out / "probes.md").read_text(), (out / "lens.md").read_text())


if __name__ == "__main__":
    main()
