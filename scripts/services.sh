#!/usr/bin/env bash
# Start / stop the long-running parts on 127.0.0.1: MLflow UI, Prefect server + worker (+ the
# deployments: scheduled retrain, and the retrain / evaluate-threshold runs the service starts) and
# the BentoML prediction service. The service never trains: with PREFECT_API_URL set, /retrain and
# /anomaly start runs of the deployments, executed by the worker. Logs and pids in runs/services/.
#   scripts/services.sh start|stop|status
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
export PREFECT_HOME=${PREFECT_HOME:-$PWD/.prefect}
MLFLOW_PORT=${MLFLOW_PORT:-5000}
PREFECT_PORT=${PREFECT_PORT:-4200}
BENTO_PORT=${BENTO_PORT:-3000}
dir=runs/services
mkdir -p "$dir" mlflow

running() { [ -f "$dir/$1.pid" ] && kill -0 "$(cat "$dir/$1.pid")" 2>/dev/null; }
launch() { # name, command...
  local name=$1; shift
  if running "$name"; then return 0; fi
  # output through a size-rotating log (10 MiB x 5 kept: runs/services/NAME.log, .log.1, ...)
  setsid nohup bash -c '"$@" 2>&1 | python -m cellscan.serve.logpipe "$0"' "$dir/$name.log" "$@" >/dev/null 2>&1 &
  echo $! >"$dir/$name.pid"
}
wait_http() { # url, seconds
  for _ in $(seq "$2"); do
    python -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)" "$1" 2>/dev/null && return 0
    sleep 1
  done
  echo "services: $1 did not answer in $2 s (see $dir/)" >&2; return 1
}

case "${1:-start}" in
  start)
    store=${MLFLOW_TRACKING_URI:-sqlite:///$PWD/mlflow/mlflow.db}
    export MLFLOW_TRACKING_URI=$store CELLSCAN_HOME=$PWD  # the same store for the worker's runs and the service
    launch mlflow mlflow ui --backend-store-uri "$store" --host 127.0.0.1 --port "$MLFLOW_PORT" --workers 1
    launch prefect prefect server start --host 127.0.0.1 --port "$PREFECT_PORT"
    wait_http "http://127.0.0.1:$PREFECT_PORT/api/health" 90
    export PREFECT_API_URL="http://127.0.0.1:$PREFECT_PORT/api"
    prefect work-pool inspect cellscan >/dev/null 2>&1 || prefect work-pool create cellscan --type process >/dev/null
    python -m flows.deploy --pool cellscan
    launch worker prefect worker start --pool cellscan
    # Safe by default: without a configured key (and without CELLSCAN_OPEN=1) one is made, readable
    # by its owner only, and the service reads it from the file.
    if [ -z "${CELLSCAN_API_KEY:-}" ] && [ -z "${CELLSCAN_API_KEY_FILE:-}" ] && [ "${CELLSCAN_OPEN:-0}" != 1 ]; then
      export CELLSCAN_API_KEY_FILE=$PWD/.cellscan/api_key
      python -c 'import sys; from pathlib import Path; from cellscan.serve.guard import ensure_key_file; ensure_key_file(Path(sys.argv[1]))' "$CELLSCAN_API_KEY_FILE"
    fi
    launch bentoml bentoml serve service.service:Cellscan --host 127.0.0.1 --port "$BENTO_PORT"
    wait_http "http://127.0.0.1:$MLFLOW_PORT/health" 90
    wait_http "http://127.0.0.1:$BENTO_PORT/readyz" 120
    echo "MLflow UI:        http://127.0.0.1:$MLFLOW_PORT"
    echo "Prefect UI:       http://127.0.0.1:$PREFECT_PORT  (deployments retrain/scheduled-retrain,"
    echo "                  retrain/service-retrain, evaluate-threshold/service-evaluate-threshold,"
    echo "                  monitor/scheduled-monitor, retrain/drift-retrain: triggered by drift events)"
    echo "drift report:     http://127.0.0.1:$BENTO_PORT/monitoring/report  (JSON: /monitoring/report.json)"
    echo "cellscan service: http://127.0.0.1:$BENTO_PORT  (API docs: http://127.0.0.1:$BENTO_PORT/docs)"
    if [ -n "${CELLSCAN_API_KEY_FILE:-}" ]; then
      echo "API key:          in $CELLSCAN_API_KEY_FILE (mode 600); send it as -H \"x-api-key: \$(cat $CELLSCAN_API_KEY_FILE)\""
    elif [ -z "${CELLSCAN_API_KEY:-}" ]; then
      echo "WARNING:          CELLSCAN_OPEN=1: /retrain, /anomaly and /rollback are open to anyone on this machine"
    fi
    echo "stop them with:   scripts/services.sh stop"
    ;;
  stop)
    for name in bentoml worker prefect mlflow; do
      if running "$name"; then
        pid=$(cat "$dir/$name.pid")
        kill -TERM -- "-$pid" 2>/dev/null || true; sleep 1; kill -TERM -- "-$pid" 2>/dev/null || true
      fi
      rm -f "$dir/$name.pid"
    done
    echo "services stopped"
    ;;
  status)
    for name in mlflow prefect worker bentoml; do
      if running "$name"; then echo "$name: running (pid $(cat "$dir/$name.pid"))"; else echo "$name: stopped"; fi
    done
    ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
