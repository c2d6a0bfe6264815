#!/usr/bin/env bash
# Before/after on one machine: decode and serving of an older commit (default: HEAD~1) against the working tree,
# alternating, in the same venv. Usage: bash benchmarks/ab.sh [REV] [ROUNDS]
set -u
cd "$(dirname "$0")/.."
rev=${1:-HEAD~1}
rounds=${2:-2}
before=$(mktemp -d)
git worktree add -f "$before" "$rev" >/dev/null 2>&1 || { echo "cannot check out $rev"; exit 2; }
trap 'git worktree remove --force "$before"' EXIT
for round in $(seq "$rounds"); do
  for src in "$before" "$PWD"; do
    echo "=== round $round $( [ "$src" = "$PWD" ] && echo after || echo "before ($rev)" ), load $(cut -d' ' -f1 /proc/loadavg)"
    PYTHONPATH="$src/src" .venv/bin/python "$src/benchmarks/decode.py" --rounds 1 \
      --engines "llmlab int4 compiled,llmlab fp32 eager" 2>&1 | grep '^| llmlab'
    # older trees' top-level llmlab.load dropped int4: point it at llmlab.api.load
    PYTHONPATH="$src/src" .venv/bin/python -c "
import sys, runpy, llmlab, llmlab.api
llmlab.load = llmlab.api.load
sys.argv = ['serve.py', '--levels', '1,16', '--requests', '2', '--max-tokens', '48', '--peers', 'none',
            '--out', '/tmp/llmlab-ab-serve.json']
runpy.run_path('$src/benchmarks/serve.py', run_name='__main__')" 2>&1 | grep 'clients='
  done
done
