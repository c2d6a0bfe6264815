#!/usr/bin/env bash
# Build llama.cpp's llama-bench, llama-server, llama-cli, llama-simple and llama-tokenize from the source vendored in
# the llama-cpp-python sdist (PyPI is the only registry this project reaches). Idempotent: prints the
# bin dir and exits at once when the tools are already built. Not a package dependency, not run by CI.
#
#   bash benchmarks/build_llamacpp.sh            # builds into ${LLMLAB_HOME:-~/.cache/llmlab}/llama.cpp
#   LLAMACPP_VERSION=0.3.16 bash benchmarks/build_llamacpp.sh
#
# The binaries end up in $DEST/build/bin; the last line printed is that directory.
set -euo pipefail

HOME_DIR="${LLMLAB_HOME:-$HOME/.cache/llmlab}"
DEST="$HOME_DIR/llama.cpp"
BIN="$DEST/build/bin"
TARGETS=(llama-bench llama-server llama-cli llama-simple llama-tokenize)
JOBS="${JOBS:-2}"
REPO="$(cd "$(dirname "$0")/.." && pwd)"
PIP="${PIP:-$([ -x "$REPO/.venv/bin/pip" ] && echo "$REPO/.venv/bin/pip" || echo "python3 -m pip")}"

have_all() {
  for t in "${TARGETS[@]}"; do [ -x "$BIN/$t" ] || return 1; done
}

if have_all; then
  echo "$BIN"
  exit 0
fi

mkdir -p "$DEST"
SRC="$DEST/src"
if [ ! -f "$SRC/CMakeLists.txt" ]; then
  SDIST="$DEST/sdist"
  mkdir -p "$SDIST"
  spec="llama-cpp-python${LLAMACPP_VERSION:+==$LLAMACPP_VERSION}"
  $PIP download --quiet --no-deps --no-binary llama-cpp-python "$spec" -d "$SDIST"
  tarball="$(ls -t "$SDIST"/llama_cpp_python-*.tar.gz | head -1)"
  rm -rf "$DEST/unpack" && mkdir -p "$DEST/unpack"
  tar -xzf "$tarball" -C "$DEST/unpack"
  rm -rf "$SRC"
  mv "$DEST"/unpack/llama_cpp_python-*/vendor/llama.cpp "$SRC"
  rm -f "$SRC/.git"  # a submodule pointer to a .git that the sdist does not ship
  rm -rf "$DEST/unpack"
fi

# On Intel CPUs with AMX, ggml's AMX path crashed for us: build for AVX-512 explicitly there.
# Elsewhere (AMD) -march=native is fine.
CPU_FLAGS=(-DGGML_NATIVE=ON)
if grep -qw amx_tile /proc/cpuinfo 2>/dev/null; then
  CPU_FLAGS=(-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON
             -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON)
fi

GEN=()
command -v ninja >/dev/null && GEN=(-G Ninja)
cmake -S "$SRC" -B "$DEST/build" "${GEN[@]}" -DCMAKE_BUILD_TYPE=Release \
  -DLLAMA_CURL=OFF -DGGML_OPENMP=ON -DBUILD_SHARED_LIBS=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=ON -DLLAMA_BUILD_SERVER=ON \
  "${CPU_FLAGS[@]}" >"$DEST/cmake.log"
# smallest first, so that a slow machine has the test tools early: llama-simple (llama + ggml only), then the
# tools on the `common` library, then the server (the largest)
cmake --build "$DEST/build" -j "$JOBS" --target llama-simple >"$DEST/build.log"
cmake --build "$DEST/build" -j "$JOBS" --target llama-tokenize llama-bench >>"$DEST/build.log"
cmake --build "$DEST/build" -j "$JOBS" --target "${TARGETS[@]}" >>"$DEST/build.log"

have_all || { echo "llama.cpp build did not produce ${TARGETS[*]} in $BIN (see $DEST/build.log)" >&2; exit 1; }
echo "$BIN"
