"""The CLI starts without PyTorch: building the parser, `llmlab --help` and `llmlab generate --help` import no torch
(about 3 s of a 4 s start). Each check runs in a fresh interpreter, since this test process may have torch loaded."""

import subprocess
import sys


def run_python(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120)


def test_build_parser_does_not_import_torch():
    r = run_python("-c", "import sys; from llmlab.cli.main import build_parser; "
                         "build_parser().parse_args(['generate', 'hi']); print('torch' in sys.modules)")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"


def test_help_does_not_import_torch():
    r = run_python("-X", "importtime", "-m", "llmlab.cli", "--help")
    assert r.returncode == 0, r.stderr
    assert "generate" in r.stdout
    imported = [line.rsplit("|", 1)[-1].strip() for line in r.stderr.splitlines() if line.startswith("import time:")]
    assert "llmlab.cli.main" in imported
    assert "torch" not in imported


def test_command_help_does_not_import_torch():
    script = ("import sys\n"
              "from llmlab.cli.main import main\n"
              "for argv in (['generate', '--help'], ['rl', '--help'], ['rag', 'ask', '--help'], "
              "['export', 'gguf', '--help']):\n"
              "    try:\n"
              "        main(argv)\n"
              "    except SystemExit as e:\n"
              "        assert e.code == 0, (argv, e.code)\n"
              "print('torch' in sys.modules)\n")
    r = run_python("-c", script)
    assert r.returncode == 0, r.stderr
    assert "--speculate" in r.stdout and "--kl-coef" in r.stdout and "--rerank-scorer" in r.stdout
    assert r.stdout.strip().splitlines()[-1] == "False"


def test_cli_names_agree_with_the_library():
    """The constants the CLI keeps so as not to import torch-heavy modules are the library's."""
    from llmlab.cli import rag
    from llmlab.rag.answer import RERANK_SCORERS
    from llmlab.rag.embed import DEFAULT_EMBEDDING_MODEL
    from llmlab.rag.index import METHODS
    from llmlab.train import config, rl

    assert rag.SEARCH_METHODS == METHODS
    assert rag.RERANK_SCORERS == RERANK_SCORERS
    assert rag.DEFAULT_EMBEDDING_MODEL == DEFAULT_EMBEDDING_MODEL

    assert config.RLConfig is rl.RLConfig  # one class: `llmlab rl` builds its flags from it without importing rl


def test_public_names_still_import():
    from llmlab.client import LocalClient  # noqa: F401
    from llmlab.train import PRESETS, Objective, TrainConfig, train  # noqa: F401
    from llmlab.train.loop import Objective as LoopObjective, train as loop_train

    assert Objective is LoopObjective and train is loop_train
