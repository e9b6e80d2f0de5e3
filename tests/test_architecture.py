"""The import contract of ``medsam2/`` (ARCHITECTURE.md), checked on every import statement of the package, lazy
ones inside functions included (they are dependencies all the same):

- no ``prefect`` or ``ray`` anywhere in the library (``flows/`` and ``tuning/`` hold them);
- ``mlflow`` only in ``medsam2/tracking`` (and not in ``flows/`` or ``tuning/`` either);
- every module belongs to one layer of ``LAYERS`` and imports only its own layer or lower ones;
- no import cycles between modules.

``KNOWN`` lists the violations that remain, each with its reason. The test fails on any violation not listed
there, and on a listed one that no longer exists (so the list only shrinks)."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO

PKG = REPO / "medsam2"

#: low → high; a module may import its own layer and lower ones. Prefixes match a module and its submodules.
LAYERS: list[tuple[str, ...]] = [
    ("medsam2.errors", "medsam2.registry", "medsam2.hashing", "medsam2.home"),                # 0 foundations
    ("medsam2.config_input", "medsam2.services", "medsam2.losses", "medsam2.metrics", "medsam2.eval",
     "medsam2.model.priors"),                                                                   # 1 pure helpers
    ("medsam2.config",),                                                                        # 2 typed configs
    ("medsam2.data",),                                                                          # 3 data
    ("medsam2.model",),                                                                         # 4 the network
    ("medsam2.semisup", "medsam2.tracking.artifacts"),                                          # 5 strategies,
                                                                                                # MLflow models' files
    ("medsam2.engine", "medsam2.active"),                                                       # 6 train/eval/predict,
                                                                                                # active learning
    ("medsam2.promotion", "medsam2.tracking"),                                                  # 7 gate, MLflow
    ("medsam2.steps", "medsam2.predict_files", "medsam2.predict_volume"),                       # 8 use cases
    ("medsam2.cli",),                                                                           # 9 the CLI
]
ROOT = "medsam2"  # the package's __init__ (its version only): importable from anywhere

#: (importer, imported) → why it is still there. Every entry is debt: remove it when the import goes.
KNOWN: dict[tuple[str, str], str] = {}


def _modules() -> dict[str, Path]:
    out = {}
    for p in PKG.rglob("*.py"):
        parts = p.relative_to(REPO).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


def _imports(mods: dict[str, Path]) -> dict[str, dict[str, int]]:
    """module → {imported name (a medsam2 module where it resolves to one, else the top-level package): line}."""
    out: dict[str, dict[str, int]] = {}
    for name, path in mods.items():
        pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found: dict[str, int] = {}
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                for a in node.names:
                    target = a.name if a.name.startswith(ROOT) else a.name.split(".")[0]
                    found.setdefault(target, node.lineno)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                    mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    mod = node.module or ""
                if not mod.startswith(ROOT):
                    found.setdefault(mod.split(".")[0], node.lineno)
                    continue
                for a in node.names:
                    sub = f"{mod}.{a.name}"
                    found.setdefault(sub if sub in mods else mod, node.lineno)
        found.pop(name, None)
        out[name] = found
    return out


def _layer(module: str) -> int:
    best = None
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and (best is None or len(p) > best[1]):
                best = (i, len(p))
    assert best is not None, f"{module} is in no layer of LAYERS: add it (ARCHITECTURE.md says where)"
    return best[0]


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_library_imports_no_orchestrator_and_mlflow_only_in_tracking():
    mods = _modules()
    bad = []
    for name, found in _imports(mods).items():
        for target, line in found.items():
            if target in ("prefect", "ray"):
                bad.append(f"{mods[name].relative_to(REPO)}:{line} imports {target}")
            if target == "mlflow" and not (name == "medsam2.tracking" or name.startswith("medsam2.tracking.")):
                bad.append(f"{mods[name].relative_to(REPO)}:{line} imports mlflow (only medsam2/tracking may)")
    assert not bad, "\n".join(bad)


def test_layers_only_look_down_and_there_is_no_cycle():
    mods = _modules()
    imports = _imports(mods)
    graph = {m: {t for t in found if t in mods and t != ROOT} for m, found in imports.items()}
    upward = {(m, t): f"{mods[m].relative_to(REPO)}:{imports[m][t]}" for m, ts in graph.items() for t in ts
              if _layer(t) > _layer(m)}
    new = {k: v for k, v in upward.items() if k not in KNOWN}
    assert not new, "imports that run up a layer (move the code, or invert the dependency):\n" + "\n".join(
        f"{where}: {m} (layer {_layer(m)}) imports {t} (layer {_layer(t)})" for (m, t), where in sorted(new.items()))
    gone = sorted(set(KNOWN) - set(upward))
    assert not gone, f"these KNOWN violations are gone: remove them from KNOWN: {gone}"

    without_known = {m: {t for t in ts if (m, t) not in KNOWN} for m, ts in graph.items()}
    cycles = _cycles(without_known)
    assert not cycles, f"import cycles: {cycles}"


def test_flows_and_tuning_reach_mlflow_only_through_tracking():
    """Every MLflow call of the project is in ``medsam2/tracking`` (runs, registry, serving, exports, sweeps): the
    thin layers above the library (``flows/``, ``tuning/``) import no mlflow."""
    bad = []
    for path in sorted([*(REPO / "flows").rglob("*.py"), *(REPO / "tuning").rglob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            bad += [f"{path.relative_to(REPO)}:{node.lineno} imports {n}" for n in names
                    if n.split(".")[0] == "mlflow"]
    assert not bad, "\n".join(bad)
