"""The served pyfunc's ``predict`` has type hints MLflow accepts (issue 14): importing, checking and logging the
model shows no "Add type hints to the `predict` method" warning (it used to end every ``medsam2 champion``)."""

from __future__ import annotations

import json
import subprocess
import sys

CODE = """
import json, warnings
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    from medsam2.tracking import MedSAM2PyFunc
    from mlflow.pyfunc.utils.data_validation import _get_func_info_if_type_hint_supported
    info = _get_func_info_if_type_hint_supported(MedSAM2PyFunc.predict)
    MedSAM2PyFunc()
print(json.dumps({"info": repr(info), "warnings": [str(w.message) for w in caught]}))
"""


def test_pyfunc_predict_has_type_hints_and_no_mlflow_warning():
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    hints = [w for w in res["warnings"] if "type hint" in w.lower()]
    assert not hints, hints
    assert "type hint" not in out.stderr.lower(), out.stderr[-2000:]
    assert res["info"] == "None"  # no schema inferred, no input conversion: dicts and lists pass through
