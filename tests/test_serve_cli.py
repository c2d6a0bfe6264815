"""`llmlab serve` as a user starts it (issue #11 item 17): a bad or busy port is one error line and exit 2, before
anything is announced or written; the feedback database lives in the llmlab home, not the current directory."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from llmlab.cli.main import main


@pytest.fixture
def elsewhere(tmp_path, monkeypatch):
    """Run from an empty directory, with the llmlab home somewhere else."""
    cwd, home = tmp_path / "cwd", tmp_path / "home"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("LLMLAB_HOME", str(home))
    return cwd, home


def one_error_line(capsys) -> str:
    out, err = capsys.readouterr()
    assert "serving" not in out
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("llmlab: error: "), err
    return lines[0]


def test_port_out_of_range_is_one_error_line(elsewhere, capsys):
    cwd, home = elsewhere
    assert main(["serve", "--port", "99999"]) == 2
    assert "--port" in one_error_line(capsys)
    assert not list(cwd.iterdir()) and not home.exists()  # nothing written anywhere


def test_port_in_use_is_one_error_line(elsewhere, capsys):
    cwd, _ = elsewhere
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--port", str(port)]) == 2
    assert f"127.0.0.1:{port}" in one_error_line(capsys)
    assert not list(cwd.iterdir())


def test_serve_announces_after_binding_and_keeps_feedback_in_the_home(elsewhere, smollm2_gguf, tmp_path):
    cwd, home = elsewhere
    log = tmp_path / "server.log"
    cmd = [sys.executable, "-m", "llmlab.cli", "serve", "--model", str(smollm2_gguf), "--port", "0", "--max-len", "256"]
    with open(log, "w") as err:
        server = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=err, text=True,
                                  env={**os.environ, "LLMLAB_HOME": str(home)})
    try:
        banner = server.stdout.readline()  # printed once the port is bound: the address is usable right away
        assert banner.startswith("llmlab serving "), banner + log.read_text()[-2000:]
        url = banner.split(" at ")[1].split()[0]
        assert not url.endswith(":0")  # port 0 announces the port it got
        for _ in range(600):  # uvicorn starts accepting once the app's startup ran
            try:
                health = httpx.get(url + "/health", timeout=5)
                break
            except httpx.ConnectError:
                server.poll()
                assert server.returncode is None, log.read_text()[-2000:]
                time.sleep(0.05)
        assert health.json()["status"] == "ok"
    finally:
        server.terminate()
        server.wait(timeout=60)
    assert (home / "feedback.sqlite").is_file()
    assert not (cwd / "feedback.sqlite").exists()
    # `llmlab feedback export` reads the same default database
    sft = Path(cwd / "sft.jsonl")
    assert main(["feedback", "export", "--sft", str(sft)]) == 0 and sft.read_text() == ""
