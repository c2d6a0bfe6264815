"""The speedrun: corpus -> tokenizer -> shards -> pretraining -> evaluation -> SFT -> DPO -> report, in one timed
run directory.

On the built-in bios world (fictional people with six facts each, knowledge-augmented biographies) so that a
model small enough for a laptop CPU can learn something checkable: whether it stored each person's facts, and
whether finetuning teaches it to answer questions about them (Physics of Language Models 3.1: SFT on the QA of
half of the people, exact match on the other, held-out half). What experiments/knowledge_extraction.py found is
applied: several shuffled, fully named biographies per person, read in a fresh order every epoch; QA as plain text
(no chat frame pretraining never saw); one question per SFT row (packed rows leak a person's other answers into the
context); a gentler SFT rate.

RUN_DIR layout when it finishes:
    corpus/      world/ (people, QA), raw.jsonl, clean.jsonl, report.{md,json} of the cleaning pipeline
    tokenizer/   the trained byte-level BPE (tokenizer.json, tokenizer_config.json with the plain QA template)
    shards/      packed train/val tokens (the train shard holds every epoch, each in its own order), manifest
    pretrain/    metrics.jsonl, loss.png, checkpoints/ (resumable with `llmlab pretrain --resume`), model/
    sft/         SFT on the questions about the training people: metrics.jsonl, checkpoints/, model/
    dpo/         DPO on (correct, wrong) answers for the same people: metrics.jsonl, checkpoints/, model/
    model/       the final model (a copy of dpo/model), a Hugging Face directory: `llmlab chat --model RUN_DIR`
    stages.png, summary.json, report.md   written last; report.md exists only when the whole run finished
"""

from llmlab.speedrun.config import PRESETS, SpeedrunConfig, preset_config
from llmlab.speedrun.pretraining import plan_steps
from llmlab.speedrun.run import speedrun

__all__ = ["PRESETS", "SpeedrunConfig", "plan_steps", "preset_config", "speedrun"]
