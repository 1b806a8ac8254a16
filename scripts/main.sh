#!/usr/bin/env bash
# The main job: set up the environment and the data, then train the Fashion-MNIST MLP (784-300-100-10) at
# 10% density with every method on the same seed and print them side by side. `--layout auto` lets each
# sparse layer take the layout measured fastest here (CSR with the C++ kernels on this CPU, instead of a
# dense weight times a mask: the sparse runs are then faster than dense). Results: runs/<name>/compare.json,
# table.txt and one result.json per method. Extra arguments go to `sparse-engine train`
# (e.g. --epochs 20, --model cnn, --device cuda).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
bash scripts/setup.sh

# Fashion-MNIST: the Debian package (installed here when root), unless the arguments say where the data is.
data_found() { (cd / && "$ROOT/.venv/bin/python" "$ROOT/scripts/install_check.py" data); }
case " $* " in
  *" --data-dir"* | *" --resume"*) ;;
  *)
    if ! data_found; then
      if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "main: installing Fashion-MNIST (apt-get install dataset-fashion-mnist)"
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 \
          || { apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null; } || true
      fi
      data_found || echo "main: Fashion-MNIST is not installed; install it with" \
        "\`sudo apt-get install dataset-fashion-mnist\` (Debian/Ubuntu) or pass --data-dir DIR (trying a download)"
    fi
    ;;
esac
exec .venv/bin/sparse-engine train --compare dense,static,signin,pilot --density 0.1 --layout auto "$@"
