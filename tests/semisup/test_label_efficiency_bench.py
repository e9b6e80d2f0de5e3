"""``benchmarks/label_efficiency.py --quick`` runs end to end on CPU and prints one JSON object."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "label_efficiency.py"


@pytest.mark.slow  # ~1 min of CPU on 2 cores: 5 tiny trainings + evaluations
def test_quick_mode(kvasir_workdir, tmp_path, capsys):  # kvasir_workdir: skips when the data is absent
    spec = importlib.util.spec_from_file_location("label_efficiency", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    result = mod.main(["--quick", "--out", str(tmp_path)])
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["mode"] == "quick" and printed["torch"] and printed["device"]
    methods = {r["method"] for r in printed["table"]}
    assert methods == {"none", "mean_teacher", "mutual_consistency", "adversarial", "self_training"}
    for row in printed["table"]:
        assert 0.0 <= row["test_dice"] <= 1.0 and row["fraction"] == 0.5
    assert (tmp_path / "label_efficiency.png").stat().st_size > 0
    assert result["table"] == printed["table"]


if __name__ == "__main__":
    pytest.main([__file__, "-q"])
