"""tests/CLAIMS.md maps every README claim to the tests that prove it; each test named there must exist.

The tests are found with ``ast`` (module-level ``test_*`` functions and ``test_*`` methods of ``Test*`` classes),
not collected or run, so this check is instant and independent of data and servers."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from tests.conftest import REPO

CLAIMS = REPO / "tests" / "CLAIMS.md"
REF = re.compile(r"`(tests/[\w/]+\.py)::(\w+)`")


def claim_rows(text: str) -> list[tuple[str, str, list[tuple[str, str]]]]:
    """(number, claim, [(path, test)]) for each data row of the claims table."""
    rows = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.startswith("|") or len(cells) != 3 or not cells[0].isdigit():
            continue
        rows.append((cells[0], cells[1], REF.findall(cells[2])))
    return rows


def defined_tests(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test"):
            names.add(node.name)
        elif isinstance(node, ast.ClassDef) and node.name.startswith("Test"):
            names |= {f"{node.name}::{n.name}" for n in node.body
                      if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name.startswith("test")}
    return names


def test_every_claim_names_tests_and_every_named_test_exists() -> None:
    rows = claim_rows(CLAIMS.read_text())
    assert len(rows) >= 50, "the claims table lost rows"
    assert [int(n) for n, _, _ in rows] == list(range(1, len(rows) + 1)), "rows are numbered 1..N"
    missing, cache = [], {}
    for n, claim, refs in rows:
        assert refs, f"claim {n} ({claim}) names no test"
        for path, name in refs:
            f = REPO / path
            if path not in cache:
                cache[path] = defined_tests(f) if f.is_file() else None
            if cache[path] is None:
                missing.append(f"claim {n}: {path} does not exist")
            elif name not in cache[path]:
                missing.append(f"claim {n}: {path}::{name} is not defined")
    assert not missing, "\n".join(missing)


def test_the_parser_reads_a_row_and_sees_a_missing_test(tmp_path) -> None:
    text = ("| # | Claim | Proven by |\n|---|---|---|\n"
            "| 1 | it works | `tests/test_claims.py::test_the_parser_reads_a_row_and_sees_a_missing_test`, "
            "`tests/test_claims.py::test_gone` *(slow)* |\n")
    ((n, claim, refs),) = claim_rows(text)
    assert (n, claim) == ("1", "it works") and [r[1] for r in refs] == [
        "test_the_parser_reads_a_row_and_sees_a_missing_test", "test_gone"]
    names = defined_tests(REPO / "tests" / "test_claims.py")
    assert refs[0][1] in names and refs[1][1] not in names
