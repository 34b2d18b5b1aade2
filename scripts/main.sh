#!/usr/bin/env bash
# The README's main command: set up .venv, then run the main job on the embedded defaults.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
. scripts/env.sh
root=$(python -c 'from cellscan.config import load_params; print(load_params().data.root)')
if [ ! -d "$root/train/good" ] && [ ! -d "$root/training" ]; then
  cellscan synth
fi
cellscan train --out models/latest --metrics metrics.json
cellscan evaluate --model models/latest
mapfile -t samples < <(ls "$root"/test/good/*.png | head -1; ls "$root"/test/*/*.png | grep -v /good/ | head -2)
cellscan predict "${samples[@]}" --model models/latest --heatmaps runs/heatmaps
echo "heatmap overlays: runs/heatmaps/"
