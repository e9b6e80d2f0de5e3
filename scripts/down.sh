#!/usr/bin/env bash
# Stop what scripts/up.sh (make up / make demo) started. State under $MEDSAM2_HOME is kept.
set -uo pipefail
source "$(dirname "$0")/env.sh"
for name in prefect-worker mlflow-server prefect-server; do
  f="$RUN/$name.pid"
  [ -f "$f" ] || continue
  pid=$(cat "$f")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null
    for _ in $(seq 1 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -KILL -- "-$pid" 2>/dev/null || true
  fi
  rm -f "$f"
  echo "stopped $name"
done
