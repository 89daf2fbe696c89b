#!/usr/bin/env bash
# Sets up, then simulates the default federation: 10 clients on a heterogeneous split of the
# digits data (Dirichlet 0.5), FedAvg, with results written under outputs/.
# Extra arguments go to `flwr run` (e.g. --run-config "strategy='fedavg' num-server-rounds=5").
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
source .venv/bin/activate
# Use the installed environment instead of re-installing dependencies for every run.
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
OUT=${OUT:-$PWD/outputs/$(date +%Y%m%d-%H%M%S)-quickstart}
flwr run . --stream --run-config "output-dir='$OUT'" --federation-config "num-supernodes=${NUM_SUPERNODES:-10}" "$@"
if [ ! -f "$OUT/results.json" ]; then
  echo "The run did not finish: see 'flwr ls' and 'flwr log <run-id> --show'." >&2
  exit 1
fi
echo "Results: $OUT (results.json, metrics.png, model.npz)"
