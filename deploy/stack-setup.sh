#!/usr/bin/env bash
# One-shot setup of the compose stack (the `setup` service of compose.yaml), idempotent: it runs on
# every `docker compose up` and only does what is missing. What scripts/main.sh does for the
# embedded default, against the stack's servers:
#   1. the project folder (CELLSCAN_HOME, a named volume): params.yaml and dvc.yaml from the image,
#      a DVC repository without git whose remote is DVC_REMOTE_URL (a volume, or s3://...);
#   2. the data version data.dvc names: pulled from the remote, else regenerated (deterministic
#      synthetic set), then added and pushed;
#   3. the Prefect work pool (process) and the deployments (python -m flows.deploy);
#   4. when the registry has no champion yet: one run of retrain/service-retrain (with no champion it
#      trains afresh), queued for the worker, which starts after this container exits.
set -euo pipefail
: "${CELLSCAN_HOME:?}" "${PREFECT_API_URL:?}" "${MLFLOW_TRACKING_URI:?}"
POOL=${CELLSCAN_WORK_POOL:-cellscan}
POOL_TYPE=${CELLSCAN_WORK_POOL_TYPE:-process}
DVC_REMOTE_URL=${DVC_REMOTE_URL:-/srv/dvc-remote}
APP=$(pwd)   # the image's code: flows/, service/, params.yaml

echo "setup: project folder $CELLSCAN_HOME"
mkdir -p "$CELLSCAN_HOME/.dvc"
cp "$APP/params.yaml" "$APP/dvc.yaml" "$CELLSCAN_HOME/"          # the image's version of the parameters
[ -f "$CELLSCAN_HOME/data.dvc" ] || cp "$APP/data.dvc" "$CELLSCAN_HOME/"  # then the project's own versions
[ -f "$CELLSCAN_HOME/.dvc/config" ] || cp "$APP/.dvc/config" "$CELLSCAN_HOME/.dvc/config"
cd "$CELLSCAN_HOME"
dvc config --local core.no_scm true          # no git in the project volume (runs log git_commit=unknown)
dvc config --local core.analytics false
dvc remote add --local --force --default local "$DVC_REMOTE_URL" >/dev/null
if [ -n "${DVC_REMOTE_ENDPOINT_URL:-}" ] && [[ $DVC_REMOTE_URL == s3://* ]]; then  # S3-compatible (MinIO, Ceph, ...)
  dvc remote modify --local local endpointurl "$DVC_REMOTE_ENDPOINT_URL"
fi

root=$(python -c 'from cellscan.core.config import load_params; print(load_params().data.root)')
if [ ! -d "$root" ] || [ -z "$(ls -A "$root" 2>/dev/null)" ]; then
  echo "setup: data: the version data.dvc names"
  pulled=0; python -m cellscan.mlops.versioning pull >/dev/null || pulled=$?
  if [ "$pulled" = 1 ]; then  # the remote did not answer (not an empty one): nothing is replaced
    echo "setup: fix DVC_REMOTE_URL (or its credentials), then start again" >&2; exit 1
  elif [ "$pulled" != 0 ]; then
    echo "setup: (remote empty: regenerating the deterministic synthetic set)"
    cellscan synth >/dev/null
  fi
  dvc add -q data && { dvc push -q data.dvc || echo "setup: dvc push failed; the data stays in the cache" >&2; }
fi

echo "setup: Prefect work pool $POOL ($POOL_TYPE) and deployments"
prefect work-pool inspect "$POOL" >/dev/null 2>&1 || prefect work-pool create "$POOL" --type "$POOL_TYPE" >/dev/null
(cd "$APP" && python -m flows.deploy --pool "$POOL" --project "$CELLSCAN_HOME")

if python - <<'PY'
import os, sys
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
name = os.environ.get("CELLSCAN_MODEL_NAME") or "cellscan"
try:
    aliases = MlflowClient().get_registered_model(name).aliases
except MlflowException:
    aliases = {}
sys.exit(0 if "champion" in aliases else 1)
PY
then
  echo "setup: the registry has a champion"
else
  echo "setup: no champion yet: queueing a first training (retrain/service-retrain) for the worker"
  prefect deployment run retrain/service-retrain >/dev/null
fi
echo "setup: done"
