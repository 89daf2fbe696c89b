#!/usr/bin/env bash
# Sets up, then runs the whole test suite (unit, property and end-to-end tests).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
source .venv/bin/activate
exec python -m pytest -q -p no:cacheprovider "$@"
