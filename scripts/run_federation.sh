#!/usr/bin/env bash
# Sets up, then simulates the default federation: 10 clients on a heterogeneous split of the
# digits data (Dirichlet 0.5), FedAvg, with results written under outputs/.
#
#   bash scripts/run_federation.sh [--preset FILE.toml] [--run-config "key=value ..."] [flwr run options]
#
# e.g. --preset presets/fedpa-digits.toml --run-config "num-server-rounds=5". The preset and the
# key=value pairs are merged (later ones win) and validated before anything starts; OUT (a
# folder) and NUM_SUPERNODES (default 10) are read from the environment. Exits 0 only when the
# run completed: results.json says "status": "completed" once every artifact is written.
# `bayesfl run` (task/cli.py) does the work; this script first sets up .venv.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
source .venv/bin/activate
if [ -n "${OUT:-}" ]; then
  set -- --run-config "output-dir='$OUT'" "$@"
fi
exec bayesfl run "$@"
