"""decode.cpp built on first use for this CPU and loaded through ctypes, the thread settings of its calls, and which
models it runs. No PyTorch here: llmlab.engine.native.lite runs a model through it in a process without PyTorch.

The library is compiled with g++ -O3 -march=native -fopenmp into $LLMLAB_HOME/native/<key> ($LLMLAB_NATIVE_CACHE/<key>
if set), where the key hashes the source, the compiler and the CPU's flags: each CPU kind gets its own build (AVX-512
where the CPU has it, else plain loops the compiler vectorises). A failed build is logged once and `load_library()`
returns None: callers keep the PyTorch path.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

from llmlab.checkpoint.registry import cache_dir

SOURCE = Path(__file__).with_name("decode.cpp")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]

PREFILL_ROWS = 64  # prompt tokens per native call of a prompt's chunks (the weights are read once per call)
LAST_ROWS = 64  # a prompt's last tokens, prefilled in a call of their own with bf16 activations (NativeDecoder.prefill)
PROMPT_KINDS = {None: 0, "chunk": 1, "last": 2}  # llmlab_step's prompt argument: decode/verify rows, a prompt's chunks

_library = None
_tried = False
CPUS = os.cpu_count() or 1  # (asking each step cost 70 us, 1% of a step)


class QMat(ctypes.Structure):
    _fields_ = [("q", ctypes.c_void_p), ("d", ctypes.c_void_p), ("m", ctypes.c_void_p), ("bias", ctypes.c_void_p),
                ("out", ctypes.c_int64), ("inp", ctypes.c_int64), ("bits", ctypes.c_int64)]


class ModelDesc(ctypes.Structure):
    _fields_ = [(name, ctypes.c_int64) for name in
                ("n_layers", "dim", "n_heads", "n_kv_heads", "head_dim", "hidden", "vocab")] + [
        ("eps", ctypes.c_double), ("embed", ctypes.c_void_p), ("embed_q", ctypes.POINTER(QMat)),
        ("norm_in", ctypes.c_void_p), ("norm_post", ctypes.c_void_p), ("norm_final", ctypes.c_void_p),
        ("inv_freq", ctypes.c_void_p), ("rope_scale", ctypes.c_float)] + [
        (name, ctypes.POINTER(QMat)) for name in ("wq", "wk", "wv", "wo", "wgate", "wup", "wdown", "head")] + [
        ("group", ctypes.c_int64), ("window", ctypes.c_int64)]  # Self-Extend (group 0: off)


def cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return " ".join(sorted(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return os.uname().machine


def build_key() -> str:
    """Source, compiler and CPU flags: a build made for one CPU kind is never loaded on another."""
    compiler = subprocess.run(["g++", "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    text = "\n".join([SOURCE.read_text(), " ".join(FLAGS), *compiler, cpu_flags()])
    data = text.encode()  # two 32-bit checksums, not hashlib: that loads OpenSSL (3.5 MiB) into every process
    return f"{zlib.crc32(data):08x}{zlib.adler32(data):08x}"


def library_path() -> Path:
    """$LLMLAB_NATIVE_CACHE (e.g. an empty directory, to time a cold start), else $LLMLAB_HOME/native."""
    root = Path(os.environ["LLMLAB_NATIVE_CACHE"]) if os.environ.get("LLMLAB_NATIVE_CACHE") else cache_dir() / "native"
    return root / build_key() / "llmlab_decode.so"


def build(path: Path) -> None:
    """Compile decode.cpp into path atomically (temp file + rename), so a crash never leaves half a library."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        out = Path(tmp) / path.name
        done = subprocess.run(["g++", *FLAGS, str(SOURCE), "-o", str(out)], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "g++ failed")
        os.replace(out, path)


def load_library():
    """The compiled library (built on first use for this CPU), or None with one line on stderr if it cannot be."""
    global _library, _tried
    if _tried:
        return _library
    _tried = True
    try:
        if shutil.which("g++") is None:
            raise RuntimeError("g++ is not installed")
        path = library_path()
        if not path.exists():
            build(path)
        lib = ctypes.CDLL(str(path))
        lib.llmlab_step.restype = None
        lib.llmlab_step.argtypes = [ctypes.POINTER(ModelDesc), ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                    ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                    ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_int,
                                    ctypes.c_void_p]
        lib.llmlab_qmatmul.argtypes = [ctypes.POINTER(QMat), ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p]
        lib.llmlab_qmatmul_step.argtypes = lib.llmlab_qmatmul.argtypes
        lib.llmlab_qmatmul_prompt.argtypes = lib.llmlab_qmatmul.argtypes
        lib.llmlab_dequantize.argtypes = [ctypes.POINTER(QMat), ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
        lib.llmlab_embed.argtypes = [ctypes.POINTER(QMat), ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p]
        lib.omp_set_num_threads.argtypes = [ctypes.c_int]
        lib.llmlab_sample.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_float, ctypes.c_int64,
                                      ctypes.c_float, ctypes.c_float, ctypes.c_void_p, ctypes.c_void_p]
        _library = lib
    except Exception as e:  # any failure means the PyTorch path, never a crash
        print(f"llmlab: native decode kernel unavailable ({type(e).__name__}: {e}); using the PyTorch path",
              file=sys.stderr)
    return _library


def loaded_library():
    """The library if something has loaded it already (the native decode path), else None: never a first build."""
    return _library


def threads() -> int:
    """Threads for the next native call: PyTorch's count (without PyTorch in the process, $OMP_NUM_THREADS or the CPUs
    this process may run on), or 1 while the machine is oversubscribed.

    A decode step has ~180 parallel sections and barriers; with more runnable processes than cores, each section waits for
    a descheduled thread (measured here at load 20 on 2 cores: 0.5 s per step with 2 threads, 0.05 s with 1).
    $LLMLAB_NATIVE_THREADS fixes the count.
    """
    fixed = os.environ.get("LLMLAB_NATIVE_THREADS")
    if fixed:
        return max(1, int(fixed))
    torch = sys.modules.get("torch")  # (never imported here: the lite runner's process has no PyTorch)
    n = torch.get_num_threads() if torch is not None else int(os.environ.get("OMP_NUM_THREADS") or 0) or (
        len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else CPUS)  # (OMP_NUM_THREADS, else the cores)
    return 1 if n > 1 and os.getloadavg()[0] > CPUS + 1 else n


def release_thread_pool() -> None:
    """Free the calling thread's OpenMP worker threads (OpenMP 5's omp_pause_resource_all, soft pause).

    libgomp keeps one pool per thread that ever ran a parallel region; with more pooled threads than cores it stops
    spinning at barriers and sleeps instead, and a native step has ~180 of them. A server loads the model in its
    main thread and decodes in the batcher's: measured on 2 cores, 19.6 ms per step from the batcher thread while
    the main thread's pool lived, 6.0 ms once it was freed (6.0 ms from the main thread itself)."""
    lib = load_library()
    pause = getattr(lib, "omp_pause_resource_all", None) if lib is not None else None  # (libgomp of GCC 9 and later)
    if pause is not None:
        pause(ctypes.c_int(1))


def simd() -> str:
    lib = load_library()
    if lib is None:
        return "none"
    if lib.llmlab_simd() != 512:
        return "scalar"
    kinds = ["avx512"] + (["int8 decode"] if lib.llmlab_int8(-1) else []) + (["bf16 prompts"] if lib.llmlab_bf16(-1) else [])
    return ", ".join(kinds)  # int8 / bf16 activations: decode.cpp, $LLMLAB_NATIVE_INT8 / $LLMLAB_NATIVE_BF16


def half_kv_cache() -> bool:
    """Whether the native step keeps an fp16 KV cache (where F16C converts it; $LLMLAB_NATIVE_KV16=0: fp32):
    llmlab.load then makes the model's caches fp16 (Transformer.kv_dtype), as llama.cpp does by default: half the
    bytes attention reads per step and half the memory per token."""
    lib = load_library()
    return lib is not None and bool(lib.llmlab_half_kv()) and os.environ.get("LLMLAB_NATIVE_KV16") != "0"


def unsupported_config(cfg) -> str | None:
    """Why the native step cannot run a model of this config (None when it can)."""
    rope = (cfg.rope_scaling or {}).get("rope_type", "default")
    checks = [
        (cfg.pos_embedding == "rope", "learned positions"), (cfg.norm == "rmsnorm", "LayerNorm"),
        (cfg.mlp == "swiglu", "a GELU MLP"), (not cfg.n_experts, "mixture-of-experts layers"),
        (rope in ("default", "linear", "llama3", "yarn"), f"RoPE scaling {rope!r}"),
        (cfg.dim % 32 == 0 and cfg.hidden_dim % 32 == 0 and cfg.head_dim % 2 == 0, "widths not multiples of 32"),
        (cfg.n_heads % cfg.n_kv_heads == 0, "query heads not a multiple of kv heads"),
    ]
    for ok, what in checks:
        if not ok:
            return f"the native decode step does not support {what}"
    return None


def prefill_calls(n: int) -> list[tuple[int, int, str]]:
    """The native calls that prefill a prompt of n tokens: (start, end, kind), "chunk"s of PREFILL_ROWS tokens that
    only write keys and values, then the "last" LAST_ROWS tokens, whose last logits choose the first token (why:
    NativeDecoder.prefill)."""
    body = n - min(n, LAST_ROWS)
    return [(s, min(body, s + PREFILL_ROWS), "chunk") for s in range(0, body, PREFILL_ROWS)] + [(body, n, "last")]


def return_freed_memory() -> None:
    """Give the C heap's free pages back to the system (glibc's malloc_trim; elsewhere nothing).

    Loading frees its temporaries (file blocks, re-laid weights, the tokenizer's build) in between the weights it
    keeps; glibc keeps such holes resident. Measured on SmolLM2's GGUF: 15 MiB less after loading, 7 MiB less at
    decode (benchmarks/memory.py), for a few milliseconds.
    """
    try:
        trim = ctypes.CDLL(None).malloc_trim  # the C library this process already uses
    except (OSError, AttributeError):  # not glibc
        return
    trim(0)
