"""A throwaway Postgres cluster, set up by infra/postgres/init-databases.sh, backing a real MLflow server.

Needs Debian's ``postgresql`` package (initdb/pg_ctl) and the ``psycopg`` driver; skips with the reason if
either is missing, or fails with it under ``MEDSAM2_REQUIRE_DATA=1`` (``make test``,
``.ci/run``). Postgres refuses to run as root, so as root the server runs as the ``postgres`` user.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import skip_or_fail

INIT_SCRIPT = Path(__file__).resolve().parents[2] / "infra" / "postgres" / "init-databases.sh"


def _pg_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    cands = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return cands[-1] if cands else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_pg_user(cmd: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return cmd
    return ["runuser", "-u", "postgres", "--", *cmd]


@pytest.fixture
def postgres():
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if not (initdb and pg_ctl and shutil.which("psql")):
        skip_or_fail("PostgreSQL binaries (initdb, pg_ctl, psql) not installed",
                     "apt-get install -y postgresql (.ci/run does this when it runs as root)")
    if os.geteuid() == 0 and subprocess.run(["id", "postgres"], capture_output=True).returncode:
        skip_or_fail("running as root and there is no `postgres` user to run the server as",
                     "apt-get install -y postgresql creates it, or run the tests as a normal user")
    root = Path(tempfile.mkdtemp(prefix="medsam2-pg-"))
    root.chmod(0o755)
    data, sock = root / "data", root / "sock"
    sock.mkdir()
    superpw = "pw-" + os.urandom(8).hex()
    (root / "pw").write_text(superpw + "\n")
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
        shutil.chown(sock, "postgres")
        shutil.chown(root / "pw", "postgres")
    port = _free_port()
    subprocess.run(
        _as_pg_user(
            [
                initdb,
                "-D",
                str(data),
                "-U",
                "postgres",
                f"--pwfile={root / 'pw'}",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
            ]
        ),
        check=True,
        capture_output=True,
    )
    opts = f"-p {port} -k {sock} -c listen_addresses=127.0.0.1"
    subprocess.run(
        _as_pg_user([pg_ctl, "-D", str(data), "-o", opts, "-l", str(root / "pg.log"), "-w", "start"]),
        check=True,
        capture_output=True,
        timeout=120,
    )
    try:
        yield {"port": port, "password": superpw}
    finally:
        subprocess.run(
            _as_pg_user([pg_ctl, "-D", str(data), "-m", "fast", "stop"]), capture_output=True, timeout=60
        )
        shutil.rmtree(root, ignore_errors=True)


def _wait_http(url: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise TimeoutError(url)


@pytest.mark.slow
def test_init_script_and_mlflow_server_on_postgres(postgres, tmp_path):
    try:
        import psycopg  # noqa: F401
    except ImportError:
        skip_or_fail("the psycopg driver is not installed", "pip install -e '.[dev]' (it pins psycopg[binary])")
    mlflow_pw, prefect_pw = "m-" + os.urandom(6).hex(), "p-" + os.urandom(6).hex()
    env = {
        **os.environ,
        "PGHOST": "127.0.0.1",
        "PGPORT": str(postgres["port"]),
        "PGPASSWORD": postgres["password"],
        "POSTGRES_USER": "postgres",
        "MLFLOW_DB_PASSWORD": mlflow_pw,
        "PREFECT_DB_PASSWORD": prefect_pw,
    }
    for _ in range(2):  # the init script is idempotent
        subprocess.run(["bash", str(INIT_SCRIPT)], env=env, check=True, capture_output=True, timeout=60)
    dbs = subprocess.run(
        ["psql", "-U", "postgres", "-d", "postgres", "-At", "-c", "SELECT datname FROM pg_database"],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    assert {"mlflow", "prefect"} <= set(dbs)

    port = _free_port()
    backend = f"postgresql+psycopg://mlflow:{mlflow_pw}@127.0.0.1:{postgres['port']}/mlflow"
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            backend,
            "--artifacts-destination",
            (tmp_path / "artifacts").as_uri(),
        ],
        stdout=(tmp_path / "mlflow.log").open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")},
    )
    try:
        uri = f"http://127.0.0.1:{port}"
        _wait_http(f"{uri}/health", server)
        from mlflow import MlflowClient

        client = MlflowClient(uri, registry_uri=uri)
        exp = client.create_experiment("infra-smoke")
        run = client.create_run(exp)
        client.log_param(run.info.run_id, "backend", "postgres")
        client.log_metric(run.info.run_id, "val_dice", 0.5, step=1)
        (tmp_path / "note.txt").write_text("hello")
        client.log_artifact(run.info.run_id, str(tmp_path / "note.txt"))
        client.set_terminated(run.info.run_id)
        got = MlflowClient(uri, registry_uri=uri).get_run(run.info.run_id)
        assert got.data.params["backend"] == "postgres" and got.data.metrics["val_dice"] == 0.5
        assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["note.txt"]
        stored = [p.read_text() for p in (tmp_path / "artifacts").rglob("note.txt")]
        assert stored == ["hello"], stored  # the artifact really lives under --artifacts-destination
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
