"""The speedrun's report: report.md (a section per stage, a summary row per checkpoint) and the stage-time plot,
both from the run's summary.json dictionary."""

from __future__ import annotations

from pathlib import Path

from llmlab.io import atomic_write_bytes
from llmlab.speedrun.loop import loop_report


def plot_stages(records: dict, png: Path):
    import io

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(records)
    secs = [records[n]["seconds"] for n in names]
    fig, ax = plt.subplots(figsize=(7, 0.5 * len(names) + 1.2), dpi=100)
    ax.barh(names[::-1], secs[::-1])
    for y, s in enumerate(secs[::-1]):
        ax.text(s, y, f" {s:.1f} s", va="center", fontsize=8)
    ax.set_xlabel("seconds")
    ax.set_title(f"speedrun stages: {sum(secs):.0f} s in all")
    ax.set_xlim(0, max(secs) * 1.25)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(png, buf.getvalue())


def render_report(s: dict) -> str:
    return "\n".join(header(s) + outcome(s) + settings_and_data(s) + pretraining(s) + knowledge(s)
                     + post_training(s["post_training"], s["config"]) + loop_report(s.get("loop")) + stage_times(s))


def header(s: dict) -> list[str]:
    cfg = s["config"]
    trial = s.get("trial_seconds_per_step") or {}
    timed = (" (a training step took " + ", ".join(f"{v:.3f} s on {k}" for k, v in trial.items())
             + " in the trial steps)") if len(trial) > 1 else ""
    return [f"# llmlab speedrun: {s['run_dir']}", "",
            f"Preset `{s['preset']}`, seed {cfg['seed']}, finished {s['finished']} on {s['machine']}, "
            f"{s['threads']} torch threads{timed}; load average {s['load_average_start']} at the start, "
            f"{s['load_average']} at the end (above 0 the cores were shared with other work and every time below "
            f"is pessimistic). Total {s['total_seconds']:.0f} s.", "",
            "Talk to the model: `llmlab chat --model " + s["run_dir"] + "` (pretrained on biographies, then "
            "finetuned to answer questions such as \"What is the birth city of <full name>?\"; the chat template is "
            "plain text, the question then the answer; it knows nothing else)."]


def outcome(s: dict) -> list[str]:
    """One row per checkpoint: the stage's time and what the checkpoint knows."""
    rows, st, dpo = s["post_training"]["rows"], s["stages"], s["post_training"]["dpo"]
    pt = s["pretrain"]
    L = ["", "## Outcome per stage", "",
         "| stage | seconds | val bits/byte | bits/byte, held-out wording of known people | QA exact match, "
         "held-out people | QA exact match, SFT'd people | DPO reward accuracy (margin), training / held-out pairs "
         "| KL to SFT |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        val = f"{pt['val_bpb']:.3f}" if r["stage"] == "pretrain" else ""
        dpo_cols = (f"{dpo['train_pairs']['accuracy']:.1%} ({dpo['train_pairs']['margin']:+.3f}) / "
                    f"{dpo['heldout_pairs']['accuracy']:.1%} ({dpo['heldout_pairs']['margin']:+.3f}) | "
                    f"{dpo['kl']:.3f}" if r["stage"] == "dpo" else " |")
        L.append(f"| {r['stage']} | {st[r['stage']]['seconds']:.0f} | {val} | {r['known_bios_bpb']:.3f} | "
                 f"**{r['qa_heldout']:.1%}** | {r['qa_trained']:.1%} | {dpo_cols} |")
    return L + ["", "*Held-out people*: only their biographies were trained on, never a question about them "
                "(knowledge extraction, the point of the run); *SFT'd people*: their questions were the SFT data."]


def settings_and_data(s: dict) -> list[str]:
    cfg, c, tk, pt = s["config"], s["corpus"], s["tokenizer"], s["pretrain"]
    L = ["", "## Settings", "", "| setting | value |", "|---|---|"]
    L += [f"| {k} | {v} |" for k, v in cfg.items()]
    L += ["", "## Data", "",
          f"The bios world: {cfg['people']} fictional people with 6 facts each; {s['bios_per_person']} differently "
          f"worded biographies per person, sentences shuffled, full names instead of pronouns ({s['augment']}).", "",
          f"- documents in: {c['docs_in']} ({c['bytes_in']:,} bytes); kept: {c['docs_kept']} "
          f"({c['bytes_kept']:,} bytes)",
          "- removed: " + (", ".join(f"{k} {v['docs']}" for k, v in c["removed"].items()) or "none")
          + " (exact + near-duplicate detection on; the web-text quality rules are off for synthetic text)",
          f"- packed tokens: {pt['data_tokens']['train']:,} train, {pt['data_tokens']['val']:,} validation; the "
          f"train shard holds {pt['data_tokens']['epochs_written']} epochs, each in a fresh order",
          "- full cleaning report: `corpus/report.md`", "",
          "## Tokenizer", "",
          f"Byte-level BPE trained on the corpus and the SFT questions, {tk['vocab_size']} tokens. Bytes per token "
          "on held-out biographies (higher is better compression):", "",
          "| tokenizer | vocabulary | bytes/token |", "|---|---:|---:|",
          f"| this run's | {tk['vocab_size']} | {tk['bytes_per_token']:.2f} |"]
    if tk.get("smollm2_bytes_per_token"):
        L.append(f"| SmolLM2 (general purpose) | {tk['smollm2_vocab_size']} | {tk['smollm2_bytes_per_token']:.2f} |")
    else:
        L.append("| SmolLM2 | - | not in the cache (`llmlab pull smollm2` to compare) |")
    return L


def pretraining(s: dict) -> list[str]:
    cfg, pt = s["config"], s["pretrain"]
    planned = pt["planned_steps"]
    cut = (f" The time budget ({cfg['time_budget']:.0f} s for the whole run) cut it from {planned['max_steps']} "
           f"planned steps (SFT from {planned['sft_steps']}, DPO from {planned['dpo_steps']}), after the trial steps "
           "timed this machine now." if pt["steps"] < planned["max_steps"] else "")
    return ["", "## Pretraining", "",
            f"A {pt['params'] / 1e6:.2f}M-parameter Llama ({cfg['n_layers']} layers, dim {cfg['dim']}, "
            f"{cfg['n_heads']} heads), {pt['steps']} steps of {pt['tokens_per_step']:,} tokens = "
            f"{pt['tokens']:,} tokens ({pt['epochs']:.1f} epochs), bf16 autocast over fp32 weights." + cut, "",
            f"- train loss: {pt['first_loss']:.3f} at step 1 -> {pt['final_loss']:.3f} at the end",
            f"- validation loss {pt['val_loss']:.3f} nats/token, **{pt['val_bpb']:.3f} bits per byte**",
            f"- {pt['tokens_per_s']:,.0f} tokens/s (median step), MFU {pt['mfu']:.1%}", "",
            "![loss curve](pretrain/loss.png)"]


def knowledge(s: dict) -> list[str]:
    cfg, ev = s["config"], s["eval"]
    f, k, u = ev["facts"], ev["heldout_known"], ev["heldout_unseen"]
    L = ["", "## Evaluation of the pretrained model", "",
         "### Knowledge: does the model complete facts about people it read about?", "",
         f"Greedy completions of {f['probes']} probes such as \"<name> was born in\" for {len(f['accuracy'])} "
         f"attributes of {cfg['eval_people']} people; exact match of the text up to the first period. The baseline "
         "always answers the attribute's most common value.", "",
         "| attribute | exact match | baseline |", "|---|---:|---:|"]
    L += [f"| {a} | {f['accuracy'][a]:.1%} | {f['baseline'][a]:.1%} |" for a in f["accuracy"]]
    L += [f"| **mean** | **{f['mean_accuracy']:.1%}** | {f['mean_baseline']:.1%} |", "", "Examples:", ""]
    L += [f"- {'✓' if e['correct'] else '✗'} {e['prompt']} → `{e['got']}` (expected `{e['expected']}`)"
          for e in f["examples"]]
    L += ["", "### Held-out biographies", "",
          "| biographies | documents | bits/byte | perplexity/token |", "|---|---:|---:|---:|",
          f"| known people, a wording never trained on | {k['documents']} | {k['bits_per_byte']:.3f} | "
          f"{k['perplexity']:.2f} |",
          f"| people not in the corpus | {u['documents']} | {u['bits_per_byte']:.3f} | {u['perplexity']:.2f} |", "",
          "The gap between the two rows is what the model knows about the people it read about.", "",
          "## Samples", "", "Sampled at temperature 0.7 after a known person's name (in bold):", ""]
    L += [f"- **{x['prompt']}**{' '.join(x['completion'].split())}" for x in ev["samples"]]
    return L


def post_training(post: dict, cfg: dict) -> list[str]:
    sft, dpo, rows = post["sft"], post["dpo"], post["rows"]
    L = ["", "## Post-training: SFT and DPO", "",
         f"- **SFT**: {sft['steps']} steps on the {sft['conversations']} questions about the training half of the "
         f"people, one question per row ({sft['rows_per_step']} rows of {sft['row_tokens']} tokens a step), only "
         f"the answer tokens carrying loss (lr {cfg['sft_lr']}); loss {sft['first_loss']:.3f} -> "
         f"{sft['final_loss']:.3f}.",
         f"- **DPO** from the SFT model (also its reference): {dpo['steps']} steps on {dpo['pairs']} pairs for the "
         f"same people, the correct answer against another person's value of the same attribute "
         f"(beta {cfg['dpo_beta']}, lr {cfg['dpo_lr']}); loss {dpo['first_loss']:.3f} -> {dpo['final_loss']:.3f}.",
         "",
         f"Greedy answers to {6 * post['qa_people']} questions about {post['qa_people']} people each side, exact "
         "match. *Right kind*: answers that are some person's value of the attribute asked about, right or wrong "
         "(the model learned how to answer, if not what). DPO's implicit reward beta * (log pi - log pi_ref) after "
         f"training: the share of pairs it ranks right and its mean chosen-minus-rejected margin (on "
         f"{dpo['train_pairs']['pairs']} training and {dpo['heldout_pairs']['pairs']} held-out pairs); the KL to the "
         "SFT reference is per answer, sampled on held-out questions.", "",
         "| checkpoint | QA exact match, SFT'd people | right kind | QA exact match, held-out people | right kind |",
         "|---|---:|---:|---:|---:|"]
    L += [f"| {r['stage']} (`{r['path']}`) | {r['qa_trained']:.1%} | {r['right_kind']:.1%} | {r['qa_heldout']:.1%} "
          f"| {r['heldout_right_kind']:.1%} |" for r in rows]
    L += ["", "Answers of the final model to questions about held-out people:", ""]
    L += [f"- {e['question']} → `{e['got']}` (expected `{e['expected']}`)" for e in rows[-1]["heldout_examples"]]
    return L


def stage_times(s: dict) -> list[str]:
    L = ["", "## Time per stage", "", "| stage | seconds | throughput |", "|---|---:|---:|"]
    for name, r in s["stages"].items():
        thr = f"{r['throughput']:,.0f} {r['unit']}" if "throughput" in r else ""
        L.append(f"| {name} | {r['seconds']:.1f} | {thr} |")
    return L + [f"| **total** | **{s['total_seconds']:.1f}** | |", "", "![stage times](stages.png)", ""]
