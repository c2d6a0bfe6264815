"""CLI commands for exporting checkpoints to other runtimes: `llmlab export gguf CKPT --type q8_0 --out FILE.gguf`."""

from __future__ import annotations

from llmlab.checkpoint.gguf_meta import EXPORT_TYPES  # (the exporter itself imports torch: in cmd_export_gguf)


def cmd_export_gguf(args) -> int:
    from llmlab.checkpoint.gguf_export import export_checkpoint
    path = export_checkpoint(args.checkpoint, args.out, args.type)
    print(path)
    return 0


def add_commands(subparsers) -> None:
    p = subparsers.add_parser("export", help="write a checkpoint in another runtime's format (GGUF for llama.cpp)")
    formats = p.add_subparsers(dest="format", required=True)
    g = formats.add_parser("gguf", help="a llama.cpp / ollama GGUF file (llama architecture)",
                           description="Export a llama-family checkpoint (registry name, checkpoint directory or "
                                       ".gguf) with its tokenizer and chat template as one GGUF file. q4_0/q4_1 "
                                       "keep the token embedding and output head at q8_0.")
    g.add_argument("checkpoint", help="registry name, checkpoint directory or .gguf file")
    g.add_argument("--type", default="q8_0", help=f"weight type: {' | '.join(EXPORT_TYPES)} (default q8_0)")
    g.add_argument("-o", "--out", required=True, help="the .gguf file to write (replaced atomically)")
    g.set_defaults(func=cmd_export_gguf)
