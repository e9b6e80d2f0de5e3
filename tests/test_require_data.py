"""``MEDSAM2_REQUIRE_DATA=1`` (``make test``, ``.ci/run``) turns a missing prerequisite from a skip into a failure
that says how to get it; without the switch the test skips, with the same advice."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import GET_SAMPLE_DATA, REPO, skip_or_fail

#: a cheap test that needs the sample data (through kvasir_workdir → sample_data)
NEEDS_DATA = "tests/engine/test_learning.py::test_ema_weights_are_exported_and_differ_from_the_live_ones"


def test_skip_or_fail_follows_the_switch(monkeypatch) -> None:
    monkeypatch.delenv("MEDSAM2_REQUIRE_DATA", raising=False)
    with pytest.raises(pytest.skip.Exception, match="thing missing: get it"):
        skip_or_fail("thing missing", "get it")
    monkeypatch.setenv("MEDSAM2_REQUIRE_DATA", "0")
    with pytest.raises(pytest.skip.Exception):
        skip_or_fail("thing missing", "get it")
    monkeypatch.setenv("MEDSAM2_REQUIRE_DATA", "1")
    with pytest.raises(pytest.fail.Exception, match="thing missing: get it .*MEDSAM2_REQUIRE_DATA=1"):
        skip_or_fail("thing missing", "get it")


@pytest.mark.parametrize("require", ["", "1"])
def test_missing_sample_data_skips_or_fails(tmp_path, require) -> None:
    env = {**os.environ, "MEDSAM2_SAMPLE_DATA": str(tmp_path / "no-such-folder"), "MEDSAM2_HOME": str(tmp_path),
           "MEDSAM2_REQUIRE_DATA": require}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rsE", "-p", "no:cacheprovider", NEEDS_DATA],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert "real sample data not found" in out and GET_SAMPLE_DATA in out.replace("\n", ""), out[-3000:]
    if require:
        assert proc.returncode == 1 and "1 error" in out, out[-3000:]
    else:
        assert proc.returncode == 0 and "1 skipped" in out, out[-3000:]
