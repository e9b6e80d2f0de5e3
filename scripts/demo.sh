#!/usr/bin/env bash
# make demo: start the stack, deploy prefect.yaml, run train-medsam2/demo on the sample data, wait, report.
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$ROOT"
t0=$(date +%s)
"$ROOT/scripts/up.sh"
prefect --no-prompt deploy --all >"$MEDSAM2_HOME/logs/deploy.log" 2>&1 || { cat "$MEDSAM2_HOME/logs/deploy.log"; exit 1; }
echo "deployed: $(grep -c "Deployment '" "$MEDSAM2_HOME/logs/deploy.log" || true) deployments (log: $MEDSAM2_HOME/logs/deploy.log)"
prefect deployment run train-medsam2/demo --watch --watch-timeout 1800 | tee "$MEDSAM2_HOME/logs/demo-run.log"
if ! grep -q "finished successfully" "$MEDSAM2_HOME/logs/demo-run.log"; then
  echo "the demo flow run did not complete; worker log: $MEDSAM2_HOME/logs/prefect-worker.log" >&2
  exit 1
fi
echo
echo "Prefect UI : http://127.0.0.1:$MEDSAM2_PREFECT_PORT  (flow run train-medsam2/demo and its tasks)"
echo "MLflow UI  : $MLFLOW_TRACKING_URI  (experiment polyp-kvasir; registered model medsam2@champion)"
medsam2 champion
echo "demo wall time: $(( $(date +%s) - t0 )) s  — stop the services with: make down"
