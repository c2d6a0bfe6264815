"""The `llmlab` command: parses arguments, calls the library, prints. Bad input is one error line, exit 2."""

from __future__ import annotations

import argparse
import json
import os
import sys

from llmlab.client import add_client_args, add_context_args
from llmlab.errors import LLMLabError


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        raise LLMLabError(f"{self.prog}: {message}")


# ---- generate / chat / info -----------------------------------------------------------------------------------


def add_model_args(p):
    """An in-process model only (commands that look at the weights themselves)."""
    p.add_argument("-m", "--model", default="smollm2", help="registry name, checkpoint directory or .gguf file")
    p.add_argument("--dtype", default="float32", help="float32 | bfloat16")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step (slow start, fast decode)")
    p.add_argument("--int4", action="store_true", help="decode with 4-bit weight copies (CPU; exact for Q4_1 GGUF)")
    p.add_argument("--exact", action="store_true", help="fp32 eager decoding (parity work; default: the fastest "
                   "path that keeps quality, e.g. the native kernel on a 4-bit GGUF's own weights)")
    add_context_args(p)


def add_sampling_args(p):
    """Sampling flags; what is not given comes from the model's generation_config.json, as in the API and server."""
    p.add_argument("-t", "--temperature", type=float, default=None, help="0 = greedy (default: the model's)")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--min-p", type=float, default=None)
    p.add_argument("--repetition-penalty", type=float, default=None)
    p.add_argument("-n", "--max-tokens", type=int, default=256, help="most new tokens")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--seed", type=int, default=None)


def gen_params(args):
    """GenParams from the sampling flags, refusing impossible values before any model loads."""
    from llmlab.client import GenParams
    from llmlab.engine import SamplingParams
    params = GenParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                       top_k=args.top_k, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                       stop=args.stop, seed=args.seed).validate()
    SamplingParams(**params.sampling_options(), max_new_tokens=params.max_tokens).validate()
    return params


def sampling_options(args) -> dict:
    """The given sampling flags as SamplingParams keywords (beam search and other in-process paths)."""
    options = dict(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
                   repetition_penalty=args.repetition_penalty, max_new_tokens=args.max_tokens, stop=args.stop,
                   seed=args.seed)
    return {k: v for k, v in options.items() if v is not None}


def load_llm(args):
    from llmlab.api import load
    if getattr(args, "endpoint", None):
        raise LLMLabError(f"llmlab {args.command} with these options needs an in-process model, not --endpoint")
    return load(args.model or "smollm2", dtype=args.dtype, compile=args.compile, int4=args.int4,
                exact=getattr(args, "exact", False), rope_scaling=getattr(args, "rope_scaling", None),
                self_extend=getattr(args, "self_extend", None))


def write_stream(pieces) -> str:
    out = []
    for piece in pieces:
        out.append(piece)
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return "".join(out)


def cmd_generate(args) -> int:
    from llmlab.cli.marks import install_watermark, watermark_config
    from llmlab.client import client_from_args
    params = gen_params(args)
    watermark = watermark_config(args)  # refused with --endpoint, --beam or --speculate, before the model loads
    prompt = args.prompt if args.prompt != "-" else sys.stdin.read()
    if args.speculate and (args.beam != 1 or args.endpoint):
        raise LLMLabError("--speculate runs in-process greedy/sampled decoding: it cannot be combined with "
                          + ("--beam" if args.beam != 1 else "--endpoint"))
    if args.beam != 1:
        from llmlab.engine import SamplingParams
        from llmlab.engine.beam import check_beam
        beam_params = check_beam(args.beam, SamplingParams(**{"temperature": 0, **sampling_options(args)}))
        llm = load_llm(args)  # refused options and widths (--beam 0) are refused above, before the model loads
        best = llm.engine.beam_search(llm.prompt_ids(prompt, raw=args.raw), args.beam, beam_params)[0]
        print(best.text)
        return 0
    if args.speculate:
        return speculative_generate(args, prompt)
    client = (None if watermark else lite_client(args)) or client_from_args(args)
    install_watermark(client, watermark)
    write_stream(client.stream(prompt, params, chat=not args.raw))
    return 0


def lite_client(args):
    """The default path of `llmlab generate` and `llmlab chat` on a GGUF the native kernel reads as it is or an llmlab
    quantized checkpoint: the same kernel, the same tokens, in a process that never imports PyTorch
    (llmlab.engine.native.lite: ~230 MiB and ~2 s less). None when an option needs the PyTorch path (an endpoint,
    --exact/--int4/--compile/--dtype, context options, a repetition penalty, a seed it cannot take), the model is not
    such a file, or $LLMLAB_LITE=0: then the PyTorch path runs."""
    from llmlab.checkpoint.registry import resolve
    from llmlab.client.lite import LiteClient
    from llmlab.engine.native.lite import SEEDS, LiteModel
    if os.environ.get("LLMLAB_LITE", "1") not in ("0", "1"):
        raise LLMLabError(f"LLMLAB_LITE must be 0 (the PyTorch path) or 1, got {os.environ['LLMLAB_LITE']!r}")
    needs_torch = (args.endpoint or args.exact or args.int4 or args.compile or args.dtype not in (None, "float32")
                   or args.rope_scaling or args.self_extend or args.repetition_penalty not in (None, 1.0)
                   or (args.seed is not None and not 0 <= args.seed < SEEDS) or os.environ.get("LLMLAB_LITE") == "0")
    if needs_torch:
        return None
    path = resolve(args.model or "smollm2")
    try:
        model = LiteModel(path)
    except LLMLabError:  # not a file it runs (dense weights, RoPE scaling...): the PyTorch path says what it does
        return None
    print(f"llmlab: {model.describe()}", file=sys.stderr)
    return LiteClient(model)


def speculative_generate(args, prompt: str) -> int:
    """generate --speculate lookup|self|draft:PATH: drafts verified by the model (the same greedy output)."""
    from llmlab.engine.draft import check_speculate
    from llmlab.engine.speculative import SpeculativeDecoder
    check_speculate(args.speculate)
    llm = load_llm(args)
    decoder = SpeculativeDecoder(llm.engine, args.speculate)
    write_stream(decoder.stream(llm.prompt_ids(prompt, raw=args.raw), llm.params(**sampling_options(args))))
    stats = decoder.stats
    print(f"speculative ({args.speculate}): {stats.acceptance_rate:.0%} of {stats.drafted} drafted tokens accepted, "
          f"{stats.tokens_per_step:.2f} tokens per model call"
          + ("; drafting turned off (slower than plain decoding here)" if stats.turned_off else ""), file=sys.stderr)
    return 0


CHAT_HELP = "commands: /reset (forget the conversation), /system TEXT (set the system prompt), Ctrl-D to quit"
LITE_NOTE = ("On a GGUF stored in Q4_0/Q4_1/Q8_0 (such as smollm2) or an llmlab quantized checkpoint, with no option "
             "that needs PyTorch, the native kernel runs in a process that never imports PyTorch (the same tokens; "
             "LLMLAB_LITE=0: the PyTorch path).")


def cmd_chat(args) -> int:
    from llmlab.cli.marks import install_watermark, watermark_config
    from llmlab.client import client_from_args
    params = gen_params(args)
    watermark = watermark_config(args)
    client = (None if watermark else lite_client(args)) or client_from_args(args)
    install_watermark(client, watermark)
    tokenizer = getattr(getattr(client, "llm", client), "tokenizer", None)  # (in-process: LocalClient or LiteClient)
    if tokenizer is not None and not tokenizer.chat_template:
        raise LLMLabError(f"{client.name} has no chat template; use `llmlab generate --raw` instead")
    interactive = sys.stdin.isatty()
    if not interactive:
        text = sys.stdin.read()
        try:  # a JSON conversation: answer its last turn
            convo = json.loads(text)
        except json.JSONDecodeError:
            convo = None
        if convo is not None:
            messages = convo.get("messages") if isinstance(convo, dict) else convo
            if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
                raise LLMLabError("stdin JSON must be a list of {role, content} messages or {\"messages\": [...]}")
            print(client.generate([messages], params)[0].text)
            return 0
        lines = text.splitlines()
    else:
        print(f"llmlab chat with {client.name} — {CHAT_HELP}", file=sys.stderr)
        lines = None
    system = args.system
    history: list[dict] = []

    def next_line():
        if lines is not None:
            return lines.pop(0) if lines else None
        try:
            return input("> ")
        except EOFError:
            print(file=sys.stderr)
            return None

    while (line := next_line()) is not None:
        line = line.strip()
        if not line:
            continue
        if line == "/reset":
            history = []
            print("(conversation reset)", file=sys.stderr)
            continue
        if line.startswith("/system"):
            system = line[len("/system"):].strip() or None
            history = []
            print(f"(system prompt {'set' if system else 'cleared'}; conversation reset)", file=sys.stderr)
            continue
        if line.startswith("/"):
            print(f"unknown command {line.split()[0]}; {CHAT_HELP}", file=sys.stderr)
            continue
        history.append({"role": "user", "content": line})
        messages = ([{"role": "system", "content": system}] if system else []) + history
        reply = []
        try:
            for piece in client.stream(messages, params):
                reply.append(piece)
                sys.stdout.write(piece)
                sys.stdout.flush()
        except KeyboardInterrupt:  # Ctrl-C stops this answer, not the chat
            if not interactive:
                raise
        sys.stdout.write("\n")
        history.append({"role": "assistant", "content": "".join(reply)})
    return 0


def cmd_info(args) -> int:
    llm = load_llm(args)
    info = llm.info()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    gib = 1024 ** 3
    print(f"model          {info['path']}")
    print(f"architecture   {info['architecture']}: {info['layers']} layers, dim {info['dim']}, "
          f"{info['heads']} heads / {info['kv_heads']} kv heads of {info['head_dim']}, ffn {info['ffn_dim']}"
          + (f", {info['experts']} experts" if info["experts"] else ""))
    print(f"blocks         {info['mlp']} MLP, {info['norm']}, positions {info['positions']}, "
          f"tied embeddings: {'yes' if info['tied_embeddings'] else 'no'}")
    print(f"parameters     {info['parameters']:,} ({info['parameters'] / 1e6:.1f}M)")
    print(f"memory         {info['weights_bytes'] / gib:.3f} GiB weights ({info['weights_storage']}), KV cache "
          f"{info['kv_cache_bytes_per_token'] / 1024:.1f} KiB/token "
          f"({info['kv_cache_bytes_per_token'] * info['context_length'] / gib:.3f} GiB at full context)")
    print(f"context        {info['context_length']:,} tokens, vocabulary {info['vocab_size']:,}")
    print(f"chat template  {'yes' if info['chat_template'] else 'no'}")
    return 0


def add_commands(sub):
    from llmlab.cli.marks import add_watermark_args
    p = sub.add_parser("generate", help="complete one prompt, streamed to stdout", description=LITE_NOTE)
    p.add_argument("prompt", help="the prompt ('-' reads stdin); wrapped in the chat template unless --raw")
    p.add_argument("--raw", action="store_true", help="send the text as is, without the chat template")
    p.add_argument("--beam", type=int, default=1, help="beam search with this many beams")
    p.add_argument("--speculate", default=None, metavar="KIND",
                   help="speculative decoding, the same greedy output: lookup (n-grams of the context), self (the "
                        "model's 4-bit copy drafts) or draft:PATH (a small model with the same tokenizer)")
    add_client_args(p)
    add_sampling_args(p)
    add_watermark_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="talk to a model (reads a conversation from stdin when piped)",
                       description=f"{CHAT_HELP}. {LITE_NOTE}")
    p.add_argument("--system", default=None, help="system prompt")
    add_client_args(p)
    add_sampling_args(p)
    add_watermark_args(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("info", help="architecture, parameter count, memory and context length of a model")
    add_model_args(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)


# ---- main -------------------------------------------------------------------------------------------------------


def build_parser() -> Parser:
    from llmlab.cli import speedrun as speedrun_commands
    from llmlab.cli import checkpoint as checkpoint_commands
    from llmlab.cli import data as data_commands
    from llmlab.cli import eval as eval_commands
    from llmlab.cli import serve as serve_commands
    from llmlab.cli import train as train_commands
    from llmlab.cli import post_train as post_commands
    from llmlab.cli import rag as rag_commands
    from llmlab.cli import export as export_commands
    from llmlab.cli import reason as reason_commands
    from llmlab.cli import inspect as inspect_commands
    from llmlab.cli import arena as arena_commands
    from llmlab.cli import safety as safety_commands
    from llmlab.cli import marks as marks_commands
    from llmlab.cli import agent as agent_commands
    from llmlab.cli import distill as distill_commands

    parser = Parser(prog="llmlab", description="A hackable toolkit for the whole life of a language model.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    checkpoint_commands.add_commands(sub)
    add_commands(sub)
    data_commands.add_commands(sub)
    speedrun_commands.add_commands(sub)
    train_commands.add_commands(sub)
    post_commands.add_commands(sub)
    serve_commands.add_commands(sub)
    eval_commands.add_commands(sub)
    rag_commands.add_commands(sub)
    export_commands.add_commands(sub)
    reason_commands.add_commands(sub)
    inspect_commands.add_commands(sub)
    arena_commands.add_commands(sub)
    safety_commands.add_commands(sub)
    marks_commands.add_commands(sub)
    agent_commands.add_commands(sub)
    distill_commands.add_commands(sub)
    return parser


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return args.func(args) or 0
    except LLMLabError as e:
        print(f"llmlab: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nllmlab: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `llmlab generate ... | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


