#!/usr/bin/env bash
# Creates .venv-flwr136 (once) with flwr 1.36, the last release whose Fleet API (SuperNode to
# SuperLink) is gRPC, plus the app's other dependencies. The deployment tests start a second
# federation from .venv-flwr136/bin to prove the app on that transport too.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
VENV=.venv-flwr136
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
# The CPU build of torch first, as in setup.sh: a bare "torch" would pull a multi-GB CUDA build.
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  "$VENV/bin/python" -m pip install -q "torch==2.13.0"
fi
"$VENV/bin/python" -m pip install -q "flwr[simulation]==1.36.*" -e ".[test]"
"$VENV/bin/flower-superlink" --version | grep -q "1\.36\." || {
  echo "$VENV does not hold flwr 1.36" >&2
  exit 1
}
