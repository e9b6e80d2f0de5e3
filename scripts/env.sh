# Shared environment for the local stack (sourced by the other scripts and by `make`).
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export MEDSAM2_ROOT="$ROOT"
export MEDSAM2_HOME="${MEDSAM2_HOME:-$ROOT/.medsam2}"
export MEDSAM2_PREFECT_PORT="${MEDSAM2_PREFECT_PORT:-4200}"
export MEDSAM2_MLFLOW_PORT="${MEDSAM2_MLFLOW_PORT:-5000}"
export PREFECT_HOME="$MEDSAM2_HOME/prefect"
export PREFECT_API_URL="http://127.0.0.1:$MEDSAM2_PREFECT_PORT/api"
export PREFECT_SERVER_ANALYTICS_ENABLED=false
export PREFECT_UI_API_URL="$PREFECT_API_URL"
export MLFLOW_TRACKING_URI="http://127.0.0.1:$MEDSAM2_MLFLOW_PORT"
export MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=false
export DO_NOT_TRACK=1
export PREFECT_LOGGING_EXTRA_LOGGERS="${PREFECT_LOGGING_EXTRA_LOGGERS:-medsam2}"  # library logs in the Prefect UI
if [ -z "${MEDSAM2_SAMPLE_DATA:-}" ] && [ -d "$ROOT/../shared/data" ]; then
  export MEDSAM2_SAMPLE_DATA="$(cd "$ROOT/../shared/data" && pwd)"
fi
VENV="$ROOT/.venv"
PATH="$VENV/bin:$PATH"
RUN="$MEDSAM2_HOME/run"
mkdir -p "$RUN" "$MEDSAM2_HOME/logs"
