"""Prompt-lookup drafts studied offline: SmolLM2's greedy answers computed once, then the SpeculativeDecoder's
drafting policy replayed against them without the model (greedy output cannot change: the verify decides every
token, so which drafts are kept depends only on the drafts and the true continuation).

    OMP_NUM_THREADS=1 LLMLAB_NATIVE_THREADS=1 /work/scratch/lowprio.sh .venv/bin/python experiments/prompt_lookup.py \
        [--stage all|data|check|replay] [--tune-per-kind 20] [--report-per-kind 8] [--new-tokens 96]

1. data: prompts of benchmarks/speculative.py's kinds: a tuning set from `--write-distill-data` (other passages
   than the benchmark's), the benchmark's own prompts (2 per kind) and a larger report set built as the benchmark
   builds them (task_prompts(per_kind, 0, 0)); SmolLM2's greedy answer to each (llmlab.load's default native path,
   --new-tokens as the benchmark's last run), the stop token included, cached in runs/prompt_lookup/*.json.
2. check: the real SpeculativeDecoder (prompt lookup, the model running) on 2 of the benchmark's prompts against
   the replay, auto-off on and off: the same verify steps, drafts and kept drafts, with the length policy's cost
   fixed in both (the engine times it) and no time-based auto-off.
3. replay: per policy and task kind: acceptance, tokens per verify step, verify steps per token, and the predicted
   decode-phase speed-up = decode tokens / sum over verify steps of (1 + SLOPE * drafted + drafting time), a verify
   of k + 1 rows costing 1 + 0.07 k plain native steps (measured in the kernel: 8 rows ~ 1.5 steps) and drafting
   its own measured time (perf_counter over many calls; CPU-only, so fine under load) in plain steps of the last
   quiet benchmark (benchmarks/results/speculative.json). One decoder serves every prompt of a set, as in the
   benchmark, its per-strength acceptance carried over; its timed slope is the model's. Policies: the drafts and
   auto-off before this experiment, and the changes one at a time (POLICIES).
Writes experiments/results/prompt_lookup/{replay,check}.{md,json} and replay.png, with Saxena's (2023) figure.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import save_figure, write_results  # noqa: E402

from llmlab.engine.draft import LookupDrafter, continuation  # noqa: E402
from llmlab.engine.speculative import (DRAFT_TOKENS, JUDGE_AFTER, PLAIN_PROBES, SpeculativeDecoder, SpeculativeStats,  # noqa: E402
                                       speculation_loses)
from llmlab.io import atomic_write_text  # noqa: E402

RESULTS = ROOT / "experiments" / "results" / "prompt_lookup"
RUN = ROOT / "runs" / "prompt_lookup"
SLOPE = 0.07  # a verify of k + 1 rows costs 1 + SLOPE * k plain native steps (kernel measurement, 8 rows ~ 1.5)
BENCH = ROOT / "benchmarks" / "results" / "speculative.json"  # the last quiet benchmark run (its plain step time)
# Saxena 2023, github.com/apoorvumang/prompt-lookup-decoding README: Mistral-7B-Instruct on one A100, greedy, max
# n-gram 3, 10 drafted tokens: "a relatively consistent 2.4x speedup (on average)" on summarisation (CNN/DailyMail)
# and context QA (HAGRID), end to end; "2x-4x in input-grounded tasks".
PAPER = ("Saxena 2023 (Mistral-7B, A100)", 2.4)
GROUNDED = ["summarise", "extract", "rewrite code", "answer"]


# ---- data: SmolLM2's greedy answers, once ----------------------------------------------------------------------


def prompt_sets(tune_per_kind: int, report_per_kind: int) -> dict[str, list[dict]]:
    """{"tune", "bench", "report"}: lists of {"kind", "prompt"}. tune: write_distill_data's prompts (the first
    tune_per_kind of each kind); bench: the benchmark's own (task_prompts(2, 0, 0)); report: task_prompts(
    report_per_kind, 0, 0), built as the benchmark builds its prompts (other passages: they depend on per_kind)."""
    import speculative as bench
    tune_file = RUN / "distill_prompts.jsonl"
    if not tune_file.is_file():
        RUN.mkdir(parents=True, exist_ok=True)
        bench.write_distill_data(str(tune_file), 400)
    tune, seen = [], {}
    for line in tune_file.read_text().splitlines():
        record = json.loads(line)
        if seen.get(record["kind"], 0) < tune_per_kind:
            seen[record["kind"]] = seen.get(record["kind"], 0) + 1
            tune.append(record)
    order = list(bench.GROUNDED) + ["open-ended"]  # the benchmark's order: open-ended prompts last
    tune.sort(key=lambda r: order.index(r["kind"]))
    built = lambda per_kind: [{"kind": kind, "prompt": p}
                              for kind, ps in bench.task_prompts(per_kind, 0, 0).items() for p in ps]
    return {"tune": tune, "bench": built(2), "report": built(report_per_kind)}


def greedy_answers(records: list[dict], new_tokens: int, path: Path) -> list[dict]:
    """Each record with its prompt ids and SmolLM2's greedy answer ("truth", the stop token included), cached."""
    cached = {}
    if path.is_file():
        cached = {(r["prompt"], r["new_tokens"]): r for r in json.loads(path.read_text())}
    todo = [r for r in records if (r["prompt"], new_tokens) not in cached]
    if todo:
        import llmlab
        import torch
        from llmlab.engine import SamplingParams
        llm = llmlab.load("smollm2", dtype=torch.float32)
        params = SamplingParams(temperature=0, max_new_tokens=new_tokens)
        for i, record in enumerate(todo):
            ids = llm.prompt_ids(record["prompt"])
            truth = greedy_truth(llm, ids, params)
            cached[(record["prompt"], new_tokens)] = dict(record, new_tokens=new_tokens, ids=ids, truth=truth)
            print(f"{path.name} {i + 1}/{len(todo)} {record['kind']}: {len(truth)} tokens", flush=True)
            atomic_write_text(path, json.dumps(list(cached.values())))
    return [cached[(r["prompt"], new_tokens)] for r in records]


def greedy_truth(llm, ids: list[int], params) -> list[int]:
    """The plain engine's greedy answer, with the stop token that ended it (a lookup may draft it too)."""
    done = llm.engine.generate([ids], params)[0]
    truth = list(done.token_ids)
    if done.completion_tokens == len(truth) + 1:  # ended by a stop token: the greedy one after the answer
        logits, _ = llm.engine.prefill(ids + truth)
        truth.append(int(logits[-1].argmax()))
    return truth


# ---- the replay ------------------------------------------------------------------------------------------------


def old_speculation_loses(stats: SpeculativeStats, plain_step_seconds: float | None, min_acceptance: float) -> bool:
    """The auto-off before this experiment: also on acceptance when timed, and at a plain step's time per token."""
    if stats.drafted < JUDGE_AFTER:
        return False
    if stats.acceptance_rate < min_acceptance:
        return True
    if plain_step_seconds is None or not stats.spec_tokens:
        return False
    return stats.spec_seconds / stats.spec_tokens > plain_step_seconds


def replay(decoder: SpeculativeDecoder, ids: list[int], truth: list[int], limit: int, draft_seconds: float = 0.0,
           slope: float = SLOPE, loses=speculation_loses) -> tuple[SpeculativeStats, float]:
    """SpeculativeDecoder.steps without the model: the verify keeps the longest drafted prefix equal to the truth,
    plus one token. Its timings are the cost model's (plain step = 1; a drafting step 1 + slope * drafted + the
    drafter's own time, draft_seconds per call in plain steps), fed where steps() feeds measured seconds, so the
    length policy and auto-off run as in the engine. Returns the stats and the decode phase's cost in plain steps
    (the prefill decides the first token in both ways). loses: the auto-off rule (speculation_loses, or the old
    one)."""
    state = decoder.drafter.start(ids, len(ids) + limit + decoder.k)
    context, mine, kept, drafting, cost, done = list(ids), SpeculativeStats(), {}, True, 0.0, 0
    strength = state.strength(context)
    draft = state.propose(context, 1, None)[0] if strength else []
    step_cost = None  # the prefill is not timed
    while True:
        i = 0
        while True:  # the verify's rows, as in steps(): stop at the first disagreement or at the end
            drafted = draft[i] if i < len(draft) else None
            if truth[done + i] != drafted or done + i + 1 == len(truth):
                break
            i += 1
        kept_now = i + (drafted is not None and truth[done + i] == drafted)
        mine.verify_steps, mine.drafted, mine.accepted, mine.tokens = (
            mine.verify_steps + 1, mine.drafted + len(draft), mine.accepted + kept_now, mine.tokens + i + 1)
        if draft:
            decoder.observe(strength, kept, kept_now, kept_now < len(draft) and kept_now == i)  # (else: finished)
        if step_cost is not None:
            cost += step_cost
            if draft:
                mine.spec_seconds, mine.spec_tokens = mine.spec_seconds + step_cost, mine.spec_tokens + i + 1
                decoder.draft_steps.append((step_cost, len(draft)))
            else:
                decoder.plain_seconds.append(step_cost)
        if drafting and loses(mine, decoder.plain_step_seconds() if decoder.auto_off else None, decoder.min_acceptance):
            drafting, mine.turned_off = False, 1
        context += truth[done:done + i + 1]
        done += i + 1
        if done == len(truth):
            decoder.stats.add(mine)
            decoder.last = mine
            return mine, cost
        room = min(decoder.k, limit - done - 1)
        probing = decoder.auto_off and len(decoder.plain_seconds) < PLAIN_PROBES
        strength = state.strength(context) if drafting and room > 0 and not probing else 0
        want = decoder.draft_length(strength, kept, room) if strength else 0
        draft = state.propose(context, want, None)[0] if want else []
        step_cost = 1.0 + (slope * len(draft) + draft_seconds if draft else 0.0)


# ---- the policies ----------------------------------------------------------------------------------------------


class LatestLookupDraft:
    """The policy before this experiment (llmlab.engine.draft until then): the latest earlier occurrence of the
    longest suffix of up to max_ngram tokens; strength = the matched n, or for a whole max_ngram match how far that
    occurrence's match runs back (up to 8)."""

    def __init__(self, max_ngram: int = 3):
        self.max_ngram, self.latest, self.indexed = max_ngram, {}, 0

    def _match(self, context):
        for end in range(max(self.indexed, 1), len(context)):
            for n in range(1, min(self.max_ngram, end) + 1):
                self.latest[tuple(context[end - n:end])] = end - n
        self.indexed = len(context)
        for n in range(min(self.max_ngram, len(context) - 1), 0, -1):
            start = self.latest.get(tuple(context[-n:]))
            if start is not None:
                return n, start
        return 0, -1

    def strength(self, context):
        n, start = self._match(context)
        if n < self.max_ngram:
            return n
        end = len(context) - n
        while n < 8 and start > 0 and context[start - 1] == context[end - 1]:
            n, start, end = n + 1, start - 1, end - 1
        return n

    def propose(self, context, k, seq):
        n, start = self._match(context)
        return (continuation(context, start + n, k) if n else []), None


class LatestLookupDrafter:
    name = "lookup"

    def __init__(self, max_ngram: int = 3):
        self.max_ngram = max_ngram

    def start(self, prompt, max_len):
        return LatestLookupDraft(self.max_ngram)


# name -> (drafter, SpeculativeDecoder options, auto-off rule); the decoder's defaults otherwise (k = DRAFT_TOKENS,
# auto-off on). "new" is what llmlab.engine.draft and llmlab.engine.speculative do now.
POLICIES = {
    "old: latest 3-gram, old auto-off": (lambda: LatestLookupDrafter(3), {}, old_speculation_loses),
    "old drafts 5-gram, old auto-off": (lambda: LatestLookupDrafter(5), {}, old_speculation_loses),
    "longest match, old auto-off": (lambda: LookupDrafter(), {}, old_speculation_loses),
    "old drafts, new auto-off": (lambda: LatestLookupDrafter(3), {}, speculation_loses),
    "new: longest match + new auto-off": (lambda: LookupDrafter(), {}, speculation_loses),
    "new, k=15 (if 16 rows ~ 2 steps)": (lambda: LookupDrafter(), {"draft_tokens": 15}, speculation_loses),
}


def drafting_seconds(make_drafter, records: list[dict], k: int = DRAFT_TOKENS) -> float:
    """The drafter's own time per step (strength + propose on a context grown one token at a time), perf_counter
    over every answer position: pure Python on one core, so load slows it only by preemption."""
    calls, seconds = 0, 0.0
    for r in records:
        state, context = make_drafter().start(r["ids"], 0), list(r["ids"])
        start = time.perf_counter()
        for token in r["truth"]:
            if state.strength(context):
                state.propose(context, k, None)
            context.append(token)
        seconds, calls = seconds + time.perf_counter() - start, calls + len(r["truth"])
    return seconds / calls


def plain_step_seconds() -> float:
    """A plain native decode step in the last quiet benchmark: the median over its prompts of the decode phase's
    seconds per token (end to end minus the prefill timed alone)."""
    rows = [r for r in json.loads(BENCH.read_text())["rows"] if r["draft"] == "lookup"]
    steps = sorted((r["tokens"] / r["plain_tok_s"] - r["prefill_s"]) / max(1, r["tokens"] - 1) for r in rows)
    return steps[len(steps) // 2]


def copy_oracle(record: dict, k: int = DRAFT_TOKENS) -> int:
    """Verify steps if every step drafted the best k-token copy of any earlier stretch of the context (knowing the
    answer): a bound for any drafter that copies from the context."""
    context, truth, done, steps = record["ids"] + record["truth"][:1], record["truth"], 1, 1
    while done < len(truth):
        best = 0
        for begin in range(len(context)):
            run = 0
            while run < min(k, len(truth) - done - 1) and begin + run < len(context) \
                    and context[begin + run] == truth[done + run]:
                run += 1
            best = max(best, run)
        context, done, steps = context + truth[done:done + best + 1], done + best + 1, steps + 1
    return steps


def replay_set(records: list[dict], policy: str, draft_seconds: float) -> list[dict]:
    """One decoder per policy over the whole set in order (as the benchmark serves its prompts): a row per prompt."""
    make, options, loses = POLICIES[policy]
    decoder = SpeculativeDecoder(None, make(), **options)
    rows = []
    for r in records:
        stats, cost = replay(decoder, r["ids"], r["truth"], r["new_tokens"], draft_seconds, loses=loses)
        rows.append(dict(kind=r["kind"], tokens=stats.tokens, steps=stats.verify_steps, drafted=stats.drafted,
                         accepted=stats.accepted, cost=cost, turned_off=stats.turned_off,
                         speedup=(stats.tokens - 1) / cost if cost else 1.0))
    return rows


def summarise(rows: list[dict], kinds: list[str]) -> dict:
    picked = [r for r in rows if r["kind"] in kinds]
    total = {key: sum(r[key] for r in picked) for key in ("tokens", "steps", "drafted", "accepted", "turned_off")}
    return dict(prompts=len(picked), tokens=total["tokens"],
                acceptance=total["accepted"] / max(1, total["drafted"]),
                tokens_per_step=total["tokens"] / total["steps"], steps_per_token=total["steps"] / total["tokens"],
                decode_speedup=sum(r["speedup"] for r in picked) / len(picked),
                pooled_speedup=sum(r["tokens"] - 1 for r in picked) / sum(r["cost"] for r in picked),
                min_speedup=min(r["speedup"] for r in picked), turned_off=total["turned_off"])


def measured(kinds: list[str]) -> float | None:
    """The last quiet benchmark's mean decode-phase ratio over these kinds (the old policy, its prompts)."""
    rows = [r for r in json.loads(BENCH.read_text())["rows"] if r["draft"] == "lookup" and r["kind"] in kinds]
    return sum(r["decode_ratio"] for r in rows) / len(rows) if rows else None


def replay_stage(data: dict[str, list[dict]]):
    plain = plain_step_seconds()
    timing = {policy: drafting_seconds(make, data["tune"]) for policy, (make, *_) in POLICIES.items()}
    groups = [(kind, [kind]) for kind in GROUNDED] + [("all input-grounded", GROUNDED), ("open-ended", ["open-ended"])]
    table = []
    for name, records in data.items():
        for group, kinds in groups:
            picked = [r for r in records if r["kind"] in kinds]
            oracle = sum(len(r["truth"]) for r in picked) / sum(copy_oracle(r) for r in picked)
            for policy in POLICIES:
                rows = replay_set(records, policy, timing[policy] / plain)
                line = dict(set=name, kind=group, policy=policy, **summarise(rows, kinds),
                            drafter_us=timing[policy] * 1e6, copy_oracle_tokens_per_step=oracle)
                if name == "bench" and policy.startswith("old:"):
                    line["measured_decode_ratio"] = measured(kinds)
                table.append(line)
    note = (f"Replay of SmolLM2-135M's greedy answers ({data['tune'][0]['new_tokens']} new tokens): a verify of k + 1 "
            f"rows costs 1 + {SLOPE} k plain steps, drafting its measured time (drafter_us; plain step "
            f"{plain * 1e3:.1f} ms in the last quiet benchmark). decode_speedup: mean over prompts of decode tokens / "
            f"cost (the prefill decides the first token both ways), as the benchmark averages; pooled_speedup: all "
            f"decode tokens / all cost; min_speedup: the worst prompt. Sets: tune = --write-distill-data prompts, "
            f"bench = the benchmark's own (2 per kind; measured_decode_ratio = its last quiet run, old policy, whose "
            f"kernel made other answers to some prompts: compare per set, not per prompt), report = task_prompts(8, "
            f"0, 0). copy_oracle: tokens per step if each draft were the best copy of any earlier stretch (knowing "
            f"the answer). {PAPER[0]}: ~{PAPER[1]}x end to end on summarisation and context QA (README of "
            f"github.com/apoorvumang/prompt-lookup-decoding).")
    write_results(RESULTS, "replay", table, note)
    plot(table)
    for line in table:
        if line["kind"] in ("all input-grounded", "open-ended"):
            print(f"{line['set']:<7} {line['kind']:<19} {line['policy']:<36} acceptance {line['acceptance']:.2f}  "
                  f"tokens/step {line['tokens_per_step']:.2f}  decode x{line['decode_speedup']:.2f}  "
                  f"pooled x{line['pooled_speedup']:.2f}  worst x{line['min_speedup']:.2f}  off {line['turned_off']}")


def plot(table: list[dict]):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    kinds = GROUNDED + ["open-ended"]
    shown = ["old: latest 3-gram, old auto-off", "longest match, old auto-off", "new: longest match + new auto-off"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharey=True)
    for ax, name in zip(axes, ("bench", "report")):
        width = 0.8 / (len(shown) + (name == "bench"))
        for i, policy in enumerate(shown):
            values = [next(r["decode_speedup"] for r in table if r["set"] == name and r["kind"] == kind
                           and r["policy"] == policy) for kind in kinds]
            ax.bar([x + i * width for x in range(len(kinds))], values, width, label=f"replay: {policy}")
        if name == "bench":
            values = [measured([kind]) or 0 for kind in kinds]
            ax.bar([x + len(shown) * width for x in range(len(kinds))], values, width, color="grey",
                   label="measured, old (quiet benchmark)")
        ax.axhline(PAPER[1], color="black", linestyle="--", linewidth=1, label=f"{PAPER[0]}: ~{PAPER[1]}x end to end")
        ax.axhline(1.0, color="black", linewidth=0.5)
        ax.set_xticks([x + width * (len(shown) - 1) / 2 for x in range(len(kinds))], kinds, fontsize=8)
        ax.set_title(f"{name} prompts: decode-phase speed-up, SmolLM2-135M")
    axes[0].set_ylabel("decode phase vs plain")
    axes[0].legend(handles=axes[0].get_legend_handles_labels()[0][-1:], fontsize=7, loc="upper right")
    axes[1].legend(fontsize=7)
    save_figure(fig, RESULTS / "replay.png")


# ---- the check against the real decoder ------------------------------------------------------------------------


class FixedCostDecoder(SpeculativeDecoder):
    """The engine's decoder with its timed inputs fixed (a draft token costs SLOPE; no time-based auto-off), so the
    same drafts are made whether the model runs or not."""

    def draft_slope(self) -> float:
        return SLOPE

    def plain_step_seconds(self):
        return None


def check_stage(records: list[dict]):
    """The real SpeculativeDecoder (model running) against the replay of this model's own plain greedy answer
    (computed afresh: a change of kernel may change an answer at a near-tie): equal counts."""
    import llmlab
    import torch
    from llmlab.engine import SamplingParams
    llm = llmlab.load("smollm2", dtype=torch.float32)
    counts = lambda s: (s.verify_steps, s.drafted, s.accepted, s.tokens, s.turned_off)
    rows = []
    for auto_off in (True, False):
        real = FixedCostDecoder(llm.engine, LookupDrafter(), auto_off=auto_off)
        replayed = FixedCostDecoder(None, LookupDrafter(), auto_off=auto_off)
        for r in records:
            params = SamplingParams(temperature=0, max_new_tokens=r["new_tokens"])
            truth = greedy_truth(llm, r["ids"], params)
            done = real.generate(r["ids"], params)
            stats, _ = replay(replayed, r["ids"], truth, r["new_tokens"])
            rows.append(dict(kind=r["kind"], auto_off=auto_off, same_as_plain=done.token_ids == truth[:len(done.token_ids)],
                             real=str(counts(real.last)), replay=str(counts(stats)),
                             equal=counts(real.last) == counts(stats)))
            print(rows[-1], flush=True)
    write_results(RESULTS, "check", rows, "(verify steps, drafted, kept, tokens, turned off): the engine's "
                  "SpeculativeDecoder with the model against the replay, draft slope fixed at "
                  f"{SLOPE} and no time-based auto-off in both (auto_off=False: every step drafts all the room).")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stage", default="all", choices=["all", "data", "check", "replay"])
    ap.add_argument("--tune-per-kind", type=int, default=20)
    ap.add_argument("--report-per-kind", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=96)
    args = ap.parse_args()
    sets = prompt_sets(args.tune_per_kind, args.report_per_kind)
    data = {name: greedy_answers(records, args.new_tokens, RUN / f"{name}.json") for name, records in sets.items()}
    if args.stage in ("all", "check"):
        check_stage(data["bench"][:1] + data["bench"][4:5])
    if args.stage in ("all", "replay"):
        replay_stage(data)


if __name__ == "__main__":
    main()
