"""The served pyfunc's ``predict`` is typed (issues 14, 19): MLflow derives the model's input schema from its
type hints (the UI shows it), and importing, checking and instantiating it shows no "Add type hints to the
`predict` method" warning (it used to end every ``medsam2 champion``)."""

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
    from mlflow.types.type_hints import _infer_schema_from_list_type_hint
    info = _get_func_info_if_type_hint_supported(MedSAM2PyFunc.predict)
    schema = _infer_schema_from_list_type_hint(info.input_type_hint)
    MedSAM2PyFunc()
print(json.dumps({"schema": str(schema), "warnings": [str(w.message) for w in caught]}))
"""


def test_pyfunc_predict_is_typed_and_shows_no_mlflow_warning():
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    hints = [w for w in res["warnings"] if "type hint" in w.lower()]
    assert not hints, hints
    assert "type hint" not in out.stderr.lower(), out.stderr[-2000:]
    for field in ("image: string", "box: Array(double)", "points: Array(Array(double))", "point_labels"):
        assert field in res["schema"], res["schema"]
