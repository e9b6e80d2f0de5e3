"""The smoke sweep against a real two-node Ray cluster (``ray start`` head + worker) joined by ``address``.

Ray 2.60 token auth: the nodes are started with ``RAY_AUTH_MODE=token`` and the session's ``RAY_AUTH_TOKEN``;
the driver joins with the same two variables (see infra/README.md). Both nodes run with ``--block`` in their
own process group, so teardown ends exactly the processes this test started (never a machine-wide
``ray stop``, which would also kill other users' Ray instances).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest

from medsam2.config import load_config
from tuning.sweep import run_sweep

RAY = str(Path(sys.executable).with_name("ray"))


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _node_ports() -> list[str]:
    agent, grpc, metrics, renv = _free_ports(4)
    return [
        "--dashboard-agent-listen-port",
        str(agent),
        "--dashboard-agent-grpc-port",
        str(grpc),
        "--metrics-export-port",
        str(metrics),
        "--runtime-env-agent-port",
        str(renv),
    ]


def _start(args: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [RAY, "start", "--block", "--disable-usage-stats", "--num-cpus", "1", *args],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    try:  # workers the raylet spawned share the group; make sure none outlive the test
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _wait_for_nodes(address: str, n: int, timeout: float = 120) -> None:
    code = (
        f"import ray,time\nray.init(address={address!r}, log_to_driver=False)\n"
        "alive = lambda: len([x for x in ray.nodes() if x['Alive']])\n"
        f"t = time.time()\nwhile alive() < {n} and time.time() - t < {timeout}:\n    time.sleep(1)\n"
        "print(alive())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout + 60)
    assert out.stdout.strip().splitlines()[-1:] == [str(n)], out.stdout + out.stderr


def _wait_for_log(proc: subprocess.Popen, log: Path, needle: str, timeout: float = 120) -> None:
    t0 = time.time()
    while needle not in log.read_text():
        if proc.poll() is not None or time.time() - t0 > timeout:
            raise RuntimeError(f"ray start failed or hung:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)


@pytest.fixture(scope="module")
def ray_cluster(ray_token, tmp_path_factory):
    temp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's unix socket paths must fit in 107 bytes
    (gcs,) = _free_ports(1)
    address = f"127.0.0.1:{gcs}"
    logs = tmp_path_factory.mktemp("ray-nodes")
    head = _start(
        [
            "--head",
            "--port",
            str(gcs),
            "--include-dashboard",
            "false",
            "--temp-dir",
            temp,
            *_node_ports(),
        ],
        logs / "head.log",
    )
    procs = [head]
    try:
        _wait_for_log(head, logs / "head.log", "Ray runtime started")
        procs.append(_start(["--address", address, *_node_ports()], logs / "worker.log"))
        _wait_for_nodes(address, 2)
        yield address
    finally:
        for p in reversed(procs):
            _stop(p)
        subprocess.run(["rm", "-rf", temp], check=False)


@pytest.mark.slow
def test_sweep_on_two_node_cluster(ray_cluster, sweep_env, tmp_path, check_sweep_tracking):
    cfg = load_config(None, sweep_env["overrides"])
    res = run_sweep(
        "smoke", 4, base_cfg=cfg, address=ray_cluster, storage_path=str(tmp_path / "ray"), seed=0, quiet=True
    )
    table = pd.read_csv(res.results_csv)
    print(table[["trial_id", "status", "val_dice_by_step"]])
    assert (res.trials, res.errored) == (4, 0)
    assert res.stopped_early >= 1
    check_sweep_tracking(res, sweep_env["uri"], 4)


def test_joining_without_the_token_is_refused(ray_cluster):
    """Token auth really is on: the session's token joins, and the same driver with a wrong token is refused
    for its token (not for any other reason, such as an address that cannot be reached)."""
    code = f"import ray\nray.init(address={ray_cluster!r}, log_to_driver=False)\nprint('JOINED', len(ray.nodes()))"
    run = lambda env: subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,  # noqa: E731
                                     timeout=120, env=env)
    ok = run(dict(os.environ))
    assert ok.returncode == 0 and "JOINED 2" in ok.stdout, ok.stdout + ok.stderr[-3000:]
    bad = run({**os.environ, "RAY_AUTH_TOKEN": "0" * 64})
    assert bad.returncode != 0 and "JOINED" not in bad.stdout
    assert "InvalidAuthToken" in bad.stderr, bad.stderr[-3000:]  # Ray's reason: "token is missing or incorrect"
