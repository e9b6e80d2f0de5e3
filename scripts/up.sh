#!/usr/bin/env bash
# Start the local stack: Prefect server, MLflow server (SQLite, 127.0.0.1), process work pool + worker.
# Idempotent: services already answering are left alone. State lives under $MEDSAM2_HOME (default .medsam2/).
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$ROOT"

wait_http() {  # url, name, seconds
  for _ in $(seq 1 "$3"); do curl -fsS "$1" >/dev/null 2>&1 && return 0; sleep 1; done
  echo "$2 did not come up at $1; see $MEDSAM2_HOME/logs/" >&2; return 1
}
start() {  # name, command...
  local name=$1; shift
  if [ -f "$RUN/$name.pid" ] && kill -0 "$(cat "$RUN/$name.pid")" 2>/dev/null; then return 0; fi
  nohup setsid "$@" >"$MEDSAM2_HOME/logs/$name.log" 2>&1 &
  echo $! >"$RUN/$name.pid"
}

fresh_prefect=0
if ! curl -fsS "$PREFECT_API_URL/health" >/dev/null 2>&1; then
  fresh_prefect=1
  start prefect-server prefect server start --host 127.0.0.1 --port "$MEDSAM2_PREFECT_PORT"
fi
if ! curl -fsS "$MLFLOW_TRACKING_URI/health" >/dev/null 2>&1; then
  # Create the SQLite schema once, before any concurrent client can race on the migration.
  python -c "import mlflow; mlflow.set_tracking_uri('sqlite:///$MEDSAM2_HOME/mlflow.db'); mlflow.search_experiments()" >/dev/null
  start mlflow-server mlflow server --host 127.0.0.1 --port "$MEDSAM2_MLFLOW_PORT" \
    --backend-store-uri "sqlite:///$MEDSAM2_HOME/mlflow.db" \
    --artifacts-destination "$MEDSAM2_HOME/mlartifacts" --workers 1
fi
wait_http "$PREFECT_API_URL/health" "Prefect server" 120
wait_http "$MLFLOW_TRACKING_URI/health" "MLflow server" 120

prefect work-pool inspect medsam2-process >/dev/null 2>&1 || prefect work-pool create medsam2-process --type process >/dev/null
if prefect global-concurrency-limit inspect gpu >/dev/null 2>&1; then
  # Leases live in the server's memory: a server stopped mid-training leaves the slot taken forever. Nothing can
  # hold it right after a fresh start, so release it.
  [ "$fresh_prefect" = 1 ] && prefect global-concurrency-limit update gpu --active-slots 0 >/dev/null
else
  prefect global-concurrency-limit create gpu --limit 1 >/dev/null
fi
start prefect-worker prefect worker start --pool medsam2-process --type process
echo "Prefect UI: http://127.0.0.1:$MEDSAM2_PREFECT_PORT   MLflow UI: $MLFLOW_TRACKING_URI"
