"""prefect.yaml is consistent with the code: every entrypoint is a Prefect flow, every flow of the lifecycle has
a deployment, and train-medsam2 has its nightly schedule and the new-labels trigger."""

from __future__ import annotations

import importlib.util
from collections import Counter

import yaml
from prefect import Flow

from tests.conftest import REPO

EXPECTED_FLOWS = {"train-medsam2", "ingest-data", "validate-data", "evaluate-model", "promote-model",
                  "retrain-on-new-labels", "sweep-medsam2"}


def _load(entrypoint: str) -> Flow:
    path, name = entrypoint.split(":")
    spec = importlib.util.spec_from_file_location(path.replace("/", ".")[:-3], REPO / path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return getattr(mod, name)


def test_deployments_match_flows():
    doc = yaml.safe_load((REPO / "prefect.yaml").read_text())
    flows = {}
    for dep in doc["deployments"]:
        flow = _load(dep["entrypoint"])
        assert isinstance(flow, Flow), dep["entrypoint"]
        flows.setdefault(flow.name, []).append(dep)
        assert set(dep.get("parameters") or {}) <= set(flow.parameters.properties), dep["name"]
    assert set(flows) == EXPECTED_FLOWS
    for name, deps in flows.items():
        assert max(Counter(d["name"] for d in deps).values()) == 1, f"duplicate deployment names for {name}"
    train = {d["name"]: d for d in flows["train-medsam2"]}
    assert train["scheduled"]["schedules"][0]["cron"]
    assert train["on-new-labels"]["triggers"][0]["expect"] == ["medsam2.labels.arrived"]
    assert train["on-new-labels"]["parameters"]["only_if_new_labels"] is True
