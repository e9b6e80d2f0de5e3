"""infra/: every file parses, and what it names (env vars, CLI, images, templates) matches the code."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
SWEEP_ENTRYPOINT = "medsam2 sweep --space gpu_h100 --num-samples 16 --json"
APP_SERVICES = ("mlflow", "prefect-server", "prefect-worker", "ray-head", "ray-gpu-worker")


def load_yaml(rel: str):
    return yaml.safe_load((INFRA / rel).read_text())


@pytest.fixture(scope="module")
def compose() -> dict:
    return load_yaml("compose.yaml")


def code_env_names() -> set[str]:
    """Env var names the project's code reads (string literals in medsam2/, tuning/, flows/)."""
    names: set[str] = set()
    for pkg in ("medsam2", "tuning", "flows"):
        for f in (ROOT / pkg).rglob("*.py"):
            names |= set(re.findall(r"[\"']((?:MEDSAM2|RAY|MLFLOW|AWS)_[A-Z0-9_]+)[\"']", f.read_text()))
    return names


def test_every_yaml_and_json_parses():
    files = sorted(p for p in INFRA.rglob("*") if p.suffix in {".yaml", ".yml", ".json"})
    assert {p.relative_to(INFRA).as_posix() for p in files} >= {
        "compose.yaml",
        "kuberay/raycluster.yaml",
        "kuberay/rayjob.yaml",
        "kuberay/rayjob-train.yaml",
        "prefect/k8s-work-pool.json",
        "prefect/docker-job-variables.yaml",
    }
    for p in files:
        doc = json.loads(p.read_text()) if p.suffix == ".json" else yaml.safe_load(p.read_text())
        assert isinstance(doc, dict), p


def test_compose_services_and_gpu(compose):
    services = compose["services"]
    assert set(services) >= {"postgres", "minio", "minio-buckets", *APP_SERVICES}
    for name in APP_SERVICES:
        assert services[name]["build"]["dockerfile"] == "infra/Dockerfile", name
    gpu = services["ray-gpu-worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]
    assert "--num-gpus=1" in services["ray-gpu-worker"]["command"]
    mlflow_cmd = " ".join(services["mlflow"]["command"])
    assert "--backend-store-uri" in mlflow_cmd and "postgresql" in mlflow_cmd
    assert "--artifacts-destination s3://" in mlflow_cmd
    assert "prefect" in " ".join(services["prefect-worker"]["command"])
    assert "--type" in services["prefect-worker"]["command"]
    for name, svc in services.items():  # UIs and APIs are published on loopback only
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), (name, port)
    assert services["postgres"]["volumes"][1].startswith(
        "./postgres/init-databases.sh:/docker-entrypoint-initdb.d/"
    )


def _env_names(svc: dict) -> set[str]:
    env = svc.get("environment", {})
    return set(env) if isinstance(env, dict) else {e.split("=", 1)[0] for e in env}


def test_compose_env_names_are_read_by_something(compose):
    """Every variable handed to an app container is read by our code or by the library it configures."""
    import mlflow.environment_variables as mlflow_env
    import prefect.settings as prefect_settings

    ours = code_env_names()
    ray_auth = {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"}  # read by Ray 2.60 (ray/_private/authentication)
    boto = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL"}
    commands = {n: json.dumps(s.get("command", "")) for n, s in compose["services"].items()}
    for name in APP_SERVICES:
        for var in _env_names(compose["services"][name]):
            if var.startswith("MEDSAM2_"):
                assert var in ours, f"{name}: {var} is not read anywhere in medsam2/, tuning/, flows/"
            elif var.startswith("PREFECT_"):
                assert hasattr(prefect_settings, var), f"{name}: {var} is not a Prefect setting"
            elif var.startswith("MLFLOW_") and not var.endswith("_PASSWORD"):
                assert hasattr(mlflow_env, var) or var in ours, f"{name}: {var} unknown to MLflow"
            elif var.startswith("RAY_"):
                assert var in ray_auth or var in ours, f"{name}: {var} is not read by Ray or our code"
            elif var.startswith("AWS_"):
                assert var in boto, f"{name}: {var}"
            else:
                assert f"${{{var}}}" in commands[name] or f"$${var}" in commands[name], (
                    f"{name}: {var} unused"
                )
    assert {"MLFLOW_TRACKING_URI", "PREFECT_API_URL", "RAY_ADDRESS", "MEDSAM2_S3_ENDPOINT_URL"} <= _env_names(
        compose["services"]["prefect-worker"]
    )


def test_env_example_has_every_variable_and_no_secrets(compose):
    text = (INFRA / "compose.yaml").read_text()
    used = set(re.findall(r"\$\{([A-Z0-9_]+)", text))
    example = dict(
        line.split("=", 1)
        for line in (INFRA / ".env.example").read_text().splitlines()
        if line and not line.startswith("#")
    )
    assert used <= set(example), f"missing from .env.example: {sorted(used - set(example))}"
    for key, value in example.items():
        if re.search(r"PASSWORD|TOKEN|SECRET|SALT", key):
            assert value == "CHANGE_ME", f"{key} must be a placeholder in .env.example"
    secrets = re.compile(
        r"(?i)(password|secret|token)\s*[:=]\s*['\"]?(?!\$|CHANGE_ME|\{\{)[A-Za-z0-9+/]{12,}"
    )
    for p in INFRA.rglob("*"):
        if p.is_file() and p.suffix in {".yaml", ".json", ".sh", ".md", ""}:
            assert not secrets.search(p.read_text()), f"{p} looks like it holds a secret"


def test_dockerfile_installs_the_project_on_cuda_python311():
    text = (INFRA / "Dockerfile").read_text()
    assert re.search(r"^FROM nvidia/cuda:\S+", text, re.M)
    assert "python3.11" in text
    assert "pyproject.toml" in text and re.search(r"pip install[^\n]*\s\.(\s|$)", text), (
        "pip install . missing"
    )
    for pkg in ("medsam2", "flows", "tuning"):
        assert f"COPY {pkg} " in text
    ignore = (INFRA / "Dockerfile.dockerignore").read_text().split()
    assert ".venv" in ignore and ".git" in ignore
    # the image serves KubeRay's Job API and dashboard probes, and talks to PostgreSQL: the `cluster` extra
    assert "['optional-dependencies']['cluster']" in text
    extra = tomllib.loads((INFRA.parent / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(r.startswith("ray[default") for r in extra["cluster"]) and any("psycopg" in r for r in extra["cluster"])


def _ray_specs():
    cluster = load_yaml("kuberay/raycluster.yaml")
    job = load_yaml("kuberay/rayjob.yaml")
    return cluster, job


def test_kuberay_cluster_and_job():
    import ray

    cluster, job = _ray_specs()
    assert cluster["kind"] == "RayCluster" and job["kind"] == "RayJob"
    for spec in (cluster["spec"], job["spec"]["rayClusterSpec"]):
        assert spec["rayVersion"] == ray.__version__
        groups = spec["workerGroupSpecs"]
        gpu = [
            g
            for g in groups
            if g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu")
        ]
        assert gpu, "a worker group must request nvidia.com/gpu"
        assert gpu[0]["rayStartParams"]["num-gpus"] == "1"
        containers = [spec["headGroupSpec"]["template"]["spec"]["containers"][0]] + [
            g["template"]["spec"]["containers"][0] for g in groups
        ]
        assert len({c["image"] for c in containers}) == 1
        for c in containers:
            env = {e["name"]: e for e in c["env"]}
            assert env["RAY_AUTH_MODE"]["value"] == "token"
            assert "secretKeyRef" in env["RAY_AUTH_TOKEN"]["valueFrom"]
            assert {"MLFLOW_TRACKING_URI", "MEDSAM2_S3_ENDPOINT_URL", "MEDSAM2_TUNE_STORAGE"} <= set(env)
    assert job["spec"]["entrypoint"] == SWEEP_ENTRYPOINT


def test_rayjob_entrypoint_is_a_real_cli_command():
    """The entrypoint names a registered space and the CLI's real `sweep` subcommand and options."""
    from tuning.spaces import SPACES

    argv = SWEEP_ENTRYPOINT.split()
    assert argv[argv.index("--space") + 1] in SPACES.names()
    from typer.testing import CliRunner

    from medsam2.cli import app

    res = CliRunner().invoke(app, [argv[1], "--help"])
    assert res.exit_code == 0, res.output
    for opt in [a for a in argv[2:] if a.startswith("--")] + ["--address"]:
        assert opt in res.output, f"`medsam2 sweep` has no {opt} option"


def test_training_rayjob_asks_for_what_its_workers_need():
    """The multi-GPU training RayJob: its entrypoint is a real `medsam2 train` call whose --set values validate,
    and its worker groups hold the GPUs and CPUs that train.num_workers × per-worker resources ask for."""
    import shlex

    from typer.testing import CliRunner

    from medsam2.cli import app
    from medsam2.config import load_config

    job = load_yaml("kuberay/rayjob-train.yaml")
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["medsam2", "train"]
    help_text = CliRunner().invoke(app, ["train", "--help"], terminal_width=200).output
    for opt in [a for a in argv[2:] if a.startswith("--")]:
        assert opt in help_text, f"`medsam2 train` has no {opt} option"
    sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    cfg = load_config(ROOT / argv[argv.index("--config") + 1], sets)
    tc = cfg.train
    assert tc.num_workers > 1 and tc.use_gpu and tc.batch_size % tc.num_workers == 0
    groups = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    gpus = sum(g["replicas"] * int(g["rayStartParams"]["num-gpus"]) for g in groups)
    cpus = sum(g["replicas"] * float(g["template"]["spec"]["containers"][0]["resources"]["requests"]["cpu"])
               for g in groups)
    assert tc.num_workers * tc.gpus_per_worker <= gpus and tc.num_workers * tc.cpus_per_worker <= cpus
    for g in groups:  # the pod's GPU limit is what Ray advertises
        limits = g["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert int(limits["nvidia.com/gpu"]) == int(g["rayStartParams"]["num-gpus"])


def test_prefect_k8s_work_pool_template():
    from prefect.utilities.templating import apply_values, find_placeholders

    tmpl = json.loads((INFRA / "prefect/k8s-work-pool.json").read_text())
    assert set(tmpl) == {"job_configuration", "variables"}
    props = tmpl["variables"]["properties"]
    assert tmpl["variables"]["type"] == "object"
    names = {p.name for p in find_placeholders(tmpl["job_configuration"])}
    assert names <= set(props), f"undeclared template variables: {sorted(names - set(props))}"
    for key in ("command", "env", "name", "namespace", "job_manifest", "cluster_config"):
        assert key in tmpl["job_configuration"]
    defaults = {k: v["default"] for k, v in props.items() if "default" in v}
    job = apply_values(tmpl["job_configuration"], defaults)["job_manifest"]
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert job["kind"] == "Job" and container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert (
        container["image"]
        == load_yaml("kuberay/raycluster.yaml")["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0][
            "image"
        ]
    )


def test_prefect_docker_job_variables():
    known = {
        "image",
        "image_pull_policy",
        "networks",
        "network_mode",
        "auto_remove",
        "volumes",
        "stream_output",
        "mem_limit",
        "memswap_limit",
        "privileged",
        "env",
        "labels",
        "name",
        "command",
        "container_create_kwargs",
        "registry_credentials",
    }
    jv = load_yaml("prefect/docker-job-variables.yaml")
    assert set(jv) <= known, sorted(set(jv) - known)
    assert jv["env"]["MLFLOW_TRACKING_URI"].startswith("http://mlflow:")
    assert all(not re.search(r"PASSWORD|SECRET|TOKEN", k) for k in jv["env"])


def test_readme_covers_the_operator_questions():
    text = (INFRA / "README.md").read_text()
    for needle in (
        "MLFLOW_TRACKING_URI",
        "PREFECT_API_URL",
        "RAY_ADDRESS",
        "MEDSAM2_S3_ENDPOINT_URL",
        "AWS_ACCESS_KEY_ID",
        "RAY_AUTH_TOKEN",
        "RAY_AUTH_MODE",
        "11.5 GiB",
        "21.5 GiB",
        "0.25",
        "0.33",
        SWEEP_ENTRYPOINT,
    ):
        assert needle in text, needle


def _dockerfile_env() -> dict[str, str]:
    """ENV key=value pairs of infra/Dockerfile (continuation lines joined)."""
    text = (INFRA / "Dockerfile").read_text().replace("\\\n", " ")
    env: dict[str, str] = {}
    for line in re.findall(r"^ENV\s+(.*)$", text, re.M):
        env.update(dict(re.findall(r"([A-Z0-9_]+)=(\S+)", line)))
    return env


def test_project_root_is_set_wherever_flow_runs_start():
    """prefect.yaml's pull step changes into $MEDSAM2_ROOT: the image defines it as its WORKDIR (which holds the
    project), and every job template that starts flow runs from the image passes the same value."""
    pull = yaml.safe_load((ROOT / "prefect.yaml").read_text())["pull"]
    dirs = [s["prefect.deployments.steps.set_working_directory"]["directory"] for s in pull
            if "prefect.deployments.steps.set_working_directory" in s]
    assert dirs == ["{{ $MEDSAM2_ROOT }}"]
    root = _dockerfile_env().get("MEDSAM2_ROOT")
    assert root, "infra/Dockerfile must set ENV MEDSAM2_ROOT"
    workdirs = re.findall(r"^WORKDIR\s+(\S+)", (INFRA / "Dockerfile").read_text(), re.M)
    assert workdirs and workdirs[-1] == root, (workdirs, root)
    compose = load_yaml("compose.yaml")
    assert compose["services"]["prefect-worker"]["environment"]["MEDSAM2_ROOT"] == root
    assert load_yaml("prefect/docker-job-variables.yaml")["env"]["MEDSAM2_ROOT"] == root
    k8s = json.loads((INFRA / "prefect/k8s-work-pool.json").read_text())
    assert k8s["variables"]["properties"]["env"]["default"]["MEDSAM2_ROOT"] == root


def test_image_holds_the_configs_the_flows_and_deployments_name():
    """The flows' default config and every config a deployment names are COPY'd into the image."""
    import inspect

    from flows.lifecycle import promote_model, retrain_on_new_labels, sweep_medsam2
    from flows.train import train_medsam2

    text = (INFRA / "Dockerfile").read_text()
    copied = set(re.findall(r"^COPY\s+(\S+)\s", text, re.M))
    assert "configs" in copied, "infra/Dockerfile must COPY configs"
    named = {inspect.signature(f.fn).parameters["config"].default
             for f in (train_medsam2, promote_model, retrain_on_new_labels, sweep_medsam2)}
    for dep in yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]:
        named.add((dep.get("parameters") or {}).get("config"))
    for cfg in sorted(c for c in named if c):
        assert (ROOT / cfg).is_file(), cfg
        assert cfg.split("/")[0] in copied, f"{cfg} is not copied into the image"
    assert "configs" not in (INFRA / "Dockerfile.dockerignore").read_text().split()


def test_serving_image_installs_what_a_served_model_needs():
    """infra/Dockerfile.serve installs the pinned dependencies minus exactly the ones a served model does not need
    (``SERVING_EXCLUDE``, mlflow aside: the scoring server is mlflow), and serves the registered champion."""
    from medsam2.tracking.serving import SERVING_EXCLUDE

    text = (INFRA / "Dockerfile.serve").read_text()
    skip = set(re.findall(r"'([a-z-]+)'", re.search(r"skip = \{([^}]*)\}", text).group(1)))
    assert skip == SERVING_EXCLUDE - {"mlflow"}
    assert "mlflow models serve" in text and "models:/medsam2@champion" in text and "USER medsam2" in text
    assert "--env-manager local" in text
