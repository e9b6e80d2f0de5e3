"""Fixtures for the data-platform tests: small copies of the shared real data in tmp_path (``sample_data`` comes
from tests/conftest.py; the copy helpers live in ``data_helpers``)."""

from __future__ import annotations

from pathlib import Path

import pytest
from data_helpers import copy_kvasir


@pytest.fixture
def kvasir_small(sample_data: Path, tmp_path: Path) -> Path:
    return copy_kvasir(sample_data, tmp_path / "kvasir-seg")
