"""The README's layout rule, as an import contract: ``medsam2/`` imports neither prefect nor ray, and mlflow
only in ``medsam2/tracking.py`` (or a ``medsam2/tracking/`` package); checked on the source with ``ast``."""

from __future__ import annotations

import ast

from tests.conftest import REPO


def _imports(path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_library_imports_no_orchestration_and_mlflow_only_in_tracking():
    files = sorted((REPO / "medsam2").rglob("*.py"))
    assert len(files) > 20
    bad = []
    for f in files:
        rel = f.relative_to(REPO).as_posix()
        found = _imports(f)
        bad += [f"{rel} imports {m}" for m in sorted(found & {"prefect", "ray"})]
        if "mlflow" in found and not (rel == "medsam2/tracking.py" or rel.startswith("medsam2/tracking/")):
            bad.append(f"{rel} imports mlflow")
    assert not bad, bad


def test_the_scan_sees_imports_inside_functions(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def f():\n    import ray.tune\n    from mlflow import MlflowClient\n")
    assert _imports(f) == {"ray", "mlflow"}
