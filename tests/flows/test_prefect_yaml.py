"""prefect.yaml is consistent with the code: every entrypoint is a Prefect flow, every flow of the lifecycle has
a deployment, and train-medsam2 has its nightly schedule and the new-labels trigger."""

from __future__ import annotations

import importlib.util
from collections import Counter

import yaml
from prefect import Flow

from tests.conftest import REPO

EXPECTED_FLOWS = {"train-medsam2", "ingest-data", "validate-data", "evaluate-model", "promote-model",
                  "retrain-on-new-labels", "sweep-medsam2", "suggest-labels"}


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
        # the typed (pydantic) parameters accept them (required ones are strings given at run time)
        flow.validate_parameters({**{k: "x" for k in flow.parameters.required}, **(dep.get("parameters") or {})})
    assert set(flows) == EXPECTED_FLOWS
    for name, deps in flows.items():
        assert max(Counter(d["name"] for d in deps).values()) == 1, f"duplicate deployment names for {name}"
    train = {d["name"]: d for d in flows["train-medsam2"]}
    assert train["scheduled"]["schedules"][0]["cron"]
    assert train["on-new-labels"]["triggers"][0]["expect"] == ["medsam2.labels.arrived"]
    assert train["on-new-labels"]["parameters"]["only_if_new_labels"] is True
    assert train["scheduled"]["parameters"]["only_if_new_labels"] is True  # both take the medsam2-retrain slot
    assert train["sweep-then-train"]["parameters"]["sweep"]["space"] == "smoke"
    (suggest,) = flows["suggest-labels"]
    assert suggest["triggers"][0]["expect"] == ["medsam2.model.promoted"]
    assert set(suggest["triggers"][0]["parameters"]) == {"model", "workdir"}


def test_flow_parameters_are_typed_for_the_ui_form():
    """train-medsam2's parameters: descriptions, the override pattern and the sweep stage as a nested model;
    what the existing deployments and tests pass (source, workdir, overrides as a list) still validates."""
    import pytest
    from prefect.exceptions import ParameterTypeError

    from flows.train import SweepStage, train_medsam2

    schema = train_medsam2.parameters.model_dump()
    props = schema["properties"]
    assert all(p.get("description") for p in props.values()), props
    assert "SweepStage" in schema["definitions"]
    ok = train_medsam2.validate_parameters({"source": "/data/x", "workdir": "/w", "overrides": ["train.lr=1e-4"],
                                            "sweep": {"space": "smoke", "num_samples": 2}})
    assert ok["sweep"] == SweepStage(space="smoke", num_samples=2)
    with pytest.raises(ParameterTypeError):
        train_medsam2.validate_parameters({"overrides": ["not-an-override"]})
