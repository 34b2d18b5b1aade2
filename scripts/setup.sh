#!/usr/bin/env bash
# Create .venv with the pinned dependencies (idempotent: reinstalls only when pyproject.toml changes).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
stamp=.venv/.cellscan-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ -x .venv/bin/python ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
if ! command -v uv >/dev/null 2>&1; then
  echo "setup: installing uv" >&2
  "$PY" -m pip install --quiet "uv==0.13.9"
fi
echo "setup: creating .venv with the pinned dependencies (first time: a few minutes)" >&2
uv venv --quiet --allow-existing --python "$("$PY" -c 'import sys; print(sys.executable)')" .venv
VIRTUAL_ENV=$PWD/.venv uv pip install --quiet -e '.[dev]'
echo "$want" > "$stamp"
