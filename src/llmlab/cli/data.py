"""CLI: `llmlab data clean|bios|pystdlib|pack` and `llmlab tokenizer train` (thin wrappers over the library)."""

from __future__ import annotations

from pathlib import Path


def _clean(args) -> int:
    from llmlab.data.clean import CleanConfig, clean_corpus
    from llmlab.data.filters import FilterConfig

    filters = FilterConfig(min_words=args.min_words, blocklist=args.blocklist)
    cfg = CleanConfig(text_field=args.text_field, skip_bad=args.skip_bad, filters=filters,
                      dedup_threshold=args.dedup_threshold, boilerplate=not args.no_boilerplate,
                      normalization=args.normalization, near_dedup=args.dedup_threshold < 1.0)
    report = clean_corpus(args.inputs, args.out, cfg, report_dir=args.report)
    print(report.summary())
    print(f"wrote {args.out}" + (f"; report in {args.report}/report.{{json,md}}" if args.report else ""))
    return 0


def _bios(args) -> int:
    from llmlab.data.bios import make_bios_world

    world = make_bios_world(args.people, args.seed, test_fraction=args.test_fraction)
    out = world.write(args.out, augment=args.augment, multi=args.multi)
    n_train = sum(p.split == "train" for p in world.people)
    print(f"wrote {out}: {len(world.people)} people ({n_train} train, {len(world.people) - n_train} test), "
          f"augment={args.augment or 'none'}")
    return 0


def _pystdlib(args) -> int:
    from llmlab.data.pystdlib import stdlib_dir, write_pystdlib

    n = write_pystdlib(args.out, sources=not args.docstrings_only, docstrings=not args.sources_only)
    print(f"wrote {args.out}: {n} documents from {stdlib_dir()}")
    return 0


def _pack(args) -> int:
    from llmlab.data.ingest import read_documents
    from llmlab.data.pack import pack_documents

    texts = (d.text for d in read_documents(args.inputs, args.text_field, skip_bad=args.skip_bad))
    m = pack_documents(texts, args.tokenizer, args.out, val_fraction=args.val_fraction, seed=args.seed)
    print(f"wrote {args.out}: train {m['tokens']['train']} tokens / {m['documents']['train']} documents, "
          f"val {m['tokens']['val']} tokens / {m['documents']['val']} documents ({m['dtype']})")
    return 0


def _tokenizer_train(args) -> int:
    from llmlab.data.ingest import read_documents
    from llmlab.tokenizer.train import bytes_per_token, train_bpe

    # every k-th document is held out (not trained on) to measure bytes per token on unseen text
    every = max(2, round(1 / args.heldout_fraction)) if args.heldout_fraction > 0 else 0
    heldout: list[str] = []

    def training_texts():
        for i, doc in enumerate(read_documents(args.inputs, args.text_field, skip_bad=args.skip_bad)):
            if every and i % every == every - 1 and len(heldout) < 2000:
                heldout.append(doc.text)
            else:
                yield doc.text

    out = train_bpe(training_texts(), args.vocab_size, args.out)
    print(f"wrote {out}/tokenizer.json and tokenizer_config.json (vocab {args.vocab_size})")
    if not heldout:
        print("no held-out documents (corpus too small); bytes per token not measured")
        return 0
    print(f"bytes/token on {len(heldout)} held-out documents: {bytes_per_token(out, heldout):.3f} (this tokenizer)")
    if args.compare:
        from llmlab.checkpoint.gguf import tokenizer_from_gguf
        from llmlab.tokenizer import Tokenizer

        p = Path(args.compare)
        other = tokenizer_from_gguf(p) if p.suffix == ".gguf" else Tokenizer.from_dir(p)
        print(f"bytes/token on the same documents: {bytes_per_token(other, heldout):.3f} ({p.name})")
    return 0


def _add_tokenizer_train(sub) -> None:
    p = sub.add_parser("train", help="train a byte-level BPE tokenizer on local files")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help=".txt/.md/.jsonl/.html files or directories")
    p.add_argument("--vocab-size", type=int, required=True)
    p.add_argument("--out", required=True, help="output tokenizer directory")
    p.add_argument("--text-field", default="text", help="JSONL field holding the text")
    p.add_argument("--skip-bad", action="store_true", help="skip malformed JSONL lines")
    p.add_argument("--heldout-fraction", type=float, default=0.02,
                   help="fraction of documents held out to report bytes per token")
    p.add_argument("--compare", metavar="GGUF_OR_DIR", help="also report bytes/token of this tokenizer (e.g. SmolLM2's GGUF)")
    p.set_defaults(func=_tokenizer_train)


def add_tokenizer_train(tokenizer_subparsers) -> None:
    """Add `train` under an existing `llmlab tokenizer` command's subparsers."""
    _add_tokenizer_train(tokenizer_subparsers)


def add_commands(subparsers) -> None:
    data = subparsers.add_parser("data", help="build training corpora: clean, bios, pystdlib, pack")
    dsub = data.add_subparsers(dest="data_command", required=True, metavar="COMMAND")

    p = dsub.add_parser("clean", help="normalize, filter and deduplicate local files into JSONL")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help=".txt/.md/.jsonl/.html files or directories")
    p.add_argument("--out", required=True, help="output JSONL file")
    p.add_argument("--text-field", default="text", help="JSONL field holding the text")
    p.add_argument("--min-words", type=int, default=50)
    p.add_argument("--dedup-threshold", type=float, default=0.8,
                   help="near-duplicate Jaccard threshold (1.0 turns near-dedup off)")
    p.add_argument("--blocklist", help="file of blocked terms, one per line (default: llmlab's small list)")
    p.add_argument("--skip-bad", action="store_true", help="skip (and count) malformed JSONL lines and unreadable files")
    p.add_argument("--report", metavar="DIR", help="write report.json and report.md here")
    p.add_argument("--no-boilerplate", action="store_true", help="keep lines repeated across many documents")
    p.add_argument("--normalization", choices=["NFC", "NFKC"], default="NFC")
    p.set_defaults(func=_clean)

    p = dsub.add_parser("bios", help="write the synthetic biographies world (biographies + QA)")
    p.add_argument("--people", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--augment", default="", help="comma list of: multi, permute, fullname")
    p.add_argument("--multi", type=int, default=5, help="biographies per person with --augment multi")
    p.add_argument("--test-fraction", type=float, default=0.5, help="fraction of people held out from QA training")
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(func=_bios)

    p = dsub.add_parser("pystdlib", help="write the Python standard library (source + docstrings) as JSONL")
    p.add_argument("--out", required=True, help="output JSONL file")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--sources-only", action="store_true")
    g.add_argument("--docstrings-only", action="store_true")
    p.set_defaults(func=_pystdlib)

    p = dsub.add_parser("pack", help="tokenize documents into train/val token shards")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="JSONL (or other supported) files or directories")
    p.add_argument("--tokenizer", required=True, help="tokenizer directory (or tokenizer.json)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--val-fraction", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--text-field", default="text")
    p.add_argument("--skip-bad", action="store_true")
    p.set_defaults(func=_pack)

    # `llmlab tokenizer train`: if another part already registered `tokenizer`, the lead wires
    # add_tokenizer_train into its subparsers instead.
    if "tokenizer" not in getattr(subparsers, "choices", {}):
        tok = subparsers.add_parser("tokenizer", help="tokenizer tools")
        tsub = tok.add_subparsers(dest="tokenizer_command", required=True, metavar="COMMAND")
        _add_tokenizer_train(tsub)

