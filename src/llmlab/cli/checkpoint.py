"""CLI commands for checkpoints: `llmlab pull [NAME]`."""

from __future__ import annotations

from llmlab.checkpoint.registry import DEFAULT_MODEL, REGISTRY, pull


def cmd_pull(args) -> int:
    path = pull(args.name, progress=not args.quiet)
    print(path)
    return 0


def add_commands(subparsers) -> None:
    known = ", ".join(f"{name} ({entry['description']})" for name, entry in REGISTRY.items())
    p = subparsers.add_parser("pull", help="download a model into the llmlab cache and print its path",
                              description=f"Download a model once into $LLMLAB_HOME (default ~/.cache/llmlab). "
                                          f"Known names: {known}. ORG/NAME fetches a Hugging Face Hub repo.")
    p.add_argument("name", nargs="?", default=DEFAULT_MODEL, help=f"registry name or ORG/NAME (default {DEFAULT_MODEL})")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=cmd_pull)
