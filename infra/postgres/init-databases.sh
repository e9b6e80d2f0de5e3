#!/bin/bash
# Runs once, on the first start of an empty Postgres volume: one database + owner per service, so Prefect
# and MLflow never share tables. Passwords come from the environment (infra/.env), never from this file.
set -euo pipefail

create() {  # name user password
  psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres \
    -v name="$1" -v user="$2" -v pass="$3" <<'SQL'
SELECT format('CREATE ROLE %I LOGIN PASSWORD %L', :'user', :'pass')
  WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'user') \gexec
SELECT format('CREATE DATABASE %I OWNER %I', :'name', :'user')
  WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = :'name') \gexec
SQL
}

create "${MLFLOW_DB:-mlflow}" "${MLFLOW_DB_USER:-mlflow}" "${MLFLOW_DB_PASSWORD:?set MLFLOW_DB_PASSWORD}"
create "${PREFECT_DB:-prefect}" "${PREFECT_DB_USER:-prefect}" "${PREFECT_DB_PASSWORD:?set PREFECT_DB_PASSWORD}"
