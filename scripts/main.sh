#!/usr/bin/env bash
# The main job: set up the environment, then train the Fashion-MNIST MLP (784-300-100-10) at 10% density
# with every method on the same seed and print them side by side. `--layout auto` lets each sparse layer
# take the layout measured fastest here (CSR with the C++ kernels on this CPU, instead of a dense weight
# times a mask: the sparse runs are then faster than dense). Results: runs/<name>/compare.json,
# table.txt and one result.json per method. Extra arguments go to `sparse-engine train`
# (e.g. --epochs 20, --model cnn, --device cuda).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/sparse-engine train --compare dense,static,signin,pilot --density 0.1 --layout auto "$@"
