#!/usr/bin/env bash
# The README's main command: set up, then run the loop on the embedded defaults.
#   data version (DVC) -> Prefect training flow -> MLflow registry (champion) -> prediction -> UIs
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
. scripts/env.sh
export PREFECT_HOME=${PREFECT_HOME:-$PWD/.prefect}
root=$(python -c 'from cellscan.core.config import load_params; print(load_params().data.root)')

echo "== 1/4 data: the version data.dvc names"
pulled=0; python -m cellscan.mlops.versioning pull >/dev/null || pulled=$?
if [ "$pulled" = 1 ]; then  # the remote did not answer (not an empty one): nothing is replaced
  echo "   fix the DVC remote (dvc remote list), then run again" >&2; exit 1
elif [ "$pulled" != 0 ]; then
  if [ -n "$(ls -A "$root" 2>/dev/null)" ]; then
    echo "   (remote empty: keeping the images already in $root)"
  else
    echo "   (remote empty: regenerating the deterministic synthetic set)"
    cellscan synth >/dev/null
  fi
fi
dvc add -q data && dvc push -q data.dvc || true
echo "   data version $(python -c 'from cellscan.mlops.versioning import data_hash; from pathlib import Path; print(data_hash(Path(".")))')"

echo "== 2/4 Prefect flow train-autoencoder (train, calibrate, register, gate)"
python -m flows.training

echo "== 3/4 prediction from models:/cellscan@champion"
mapfile -t samples < <(ls "$root"/test/good/*.png | head -1; ls "$root"/test/*/*.png | grep -v /good/ | head -2)
cellscan predict "${samples[@]}" --model models:/cellscan@champion --heatmaps runs/heatmaps
cellscan models list

echo "== 4/4 services"
./scripts/services.sh start
