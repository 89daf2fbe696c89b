#!/usr/bin/env bash
# Sets up, then runs the whole test suite (unit, property and end-to-end tests). The deployment
# tests run a federation on the default flwr and one on flwr 1.36 (gRPC), from .venv-flwr136.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
bash scripts/setup_flwr136.sh
source .venv/bin/activate
# The tests train tiny models: one thread each avoids oversubscribing a 2-core CI machine.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec python -m pytest -q -p no:cacheprovider "$@"
