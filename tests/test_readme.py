"""README.md cannot drift from the code (issue 14): every command of its shell blocks is either run here, as
written, in a temporary MEDSAM2_HOME (and must exit with the code the README gives it), or listed below with the
reason it cannot run in a test. A new or changed command fails this test until it is classified."""

from __future__ import annotations

import os
import re
import subprocess

import pytest

from tests.conftest import GET_SAMPLE_DATA, REPO, sample_root, skip_or_fail

pytestmark = pytest.mark.slow  # each medsam2 call is a fresh interpreter (torch, mlflow): minutes on 2 cores

RUN = {  # command as written → expected exit code
    "source scripts/env.sh": 0,
    'medsam2 train --set train.lrr=1e-4 --json': 2,
    'medsam2 ingest "$MEDSAM2_HOME/no-such-folder" --json': 3,
    "MLFLOW_TRACKING_URI=http://127.0.0.1:9 medsam2 champion --json": 4,
    'medsam2 ingest "$MEDSAM2_SAMPLE_DATA/brats2021-flair-edema" --workdir "$MEDSAM2_HOME/work" --json': 0,
    'medsam2 validate --workdir "$MEDSAM2_HOME/work"': 0,
}

SKIP = {  # command as written → why a test does not run it
    "medsam2 predict --model models:/medsam2@champion --volume ct.nii.gz --slice 12 --box 30,25,80,70 --out preds "
    "--json": "needs a registered champion (tests/engine/test_predict_volume.py runs --volume on the shared CT)",
    "medsam2 predict --model final.pt --volume /data/ct_series --slice 3 --slice 15 --mask key.png --out preds "
    "--json": "a placeholder series (tests/engine/test_predict_volume.py runs it on the shared DICOM CT series)",
    "medsam2 evaluate --model final.pt --volumes volumes.yaml --volumes-only --report reports/3d --json":
        "a placeholder model and list (tests/engine/test_volume_eval.py runs it on the shared CT and MR)",
    "mlflow models serve -m models:/medsam2@champion --env-manager local -h 127.0.0.1 -p 8080":
        "a long-running server (tests/engine/test_serving.py starts it on a free port with a registered champion)",
    "IMG=$(base64 -w0 polyp.jpg)": "a placeholder for the reader's own image (the serving test posts real ones)",
    ("""curl -s http://127.0.0.1:8080/invocations -H 'Content-Type: application/json' -d '{"inputs": """
     """[{"image": "'"$IMG"'", "box": [120, 88, 410, 350]}], "params": {"format": "rle"}}'"""):
        "needs the server above (tests/engine/test_serving.py posts the same request shape over HTTP)",
    "VOL=$(base64 -w0 ct.nii.gz)": "the reader's own volume (the volume serving test sends real ones)",
    ("""curl -s http://127.0.0.1:8080/invocations -H 'Content-Type: application/json' -d '{"inputs": """
     """[{"volume": "'"$VOL"'", "prompts": [{"slice": 12, "box": [30, 25, 80, 70]}]}]}'"""):
        "needs the server above (tests/engine/test_serve_volume.py sends this record through the logged pyfunc)",
    "make demo": "the full local stack and a training run (~10 min); the flow tests run its parts",
    "make test": "the test suite itself",
    "medsam2 ingest /data/my-ct-export --workdir .medsam2/work --json":
        "a placeholder for the reader's own folder (the sample-data block runs the same command)",
    "medsam2 ingest s3://bucket/prefix --workdir .medsam2/work --s3-endpoint-url http://minio:9000":
        "needs an S3 endpoint (tests/data/test_s3.py runs ingest against moto)",
    "medsam2 ingest /data/custom --layout my_layout.yaml": "a placeholder folder and layout file",
    "medsam2 validate --workdir .medsam2/work": "the checkout's work dir (the sample-data block runs validate)",
    "medsam2 train --config configs/demo.yaml --set data.train_datasets='[my-ct-export]' --set "
    "model.image_size=1024 --set model.checkpoint=sam2.1_hiera_tiny --json":
        "a 1024 px model with Meta's downloaded weights, tracked on the MLflow server of `make up`",
    "medsam2 predict scan1.png scan2.png --model models:/medsam2@champion --out preds --box 40,30,200,180":
        "needs the champion of `make demo` (tests/engine/test_predict*.py run predict on a tiny checkpoint)",
    "medsam2 predict --prompts prompts.csv --model models:/medsam2@champion --out preds --json":
        "needs the champion of `make demo` and the reader's prompt file (tests/engine/test_predict_prompts.py)",
    'medsam2 predict --workdir "$MEDSAM2_HOME/work" --model models:/medsam2@champion --out preds --json':
        "needs the champion of `make demo` (tests/engine/test_predict_prompts.py::test_manifest_boxes)",
    "medsam2 export --model models:/medsam2@champion --format onnx --quantize int8 --out champion-onnx --json":
        "needs the champion of `make demo` (tests/engine/test_export.py exports a registered model the same way)",
    "medsam2 predict scan1.png --model champion-onnx --engine onnx --box 40,30,200,180 --out preds":
        "needs the export above (tests/engine/test_export.py::test_cli_predict_engine_onnx_gives_the_pytorch_masks)",
    "medsam2 predict scan1.png --model models:/medsam2@champion --engine onnx --precision int8 --box "
    "40,30,200,180 --out preds":
        "needs the champion and its logged export (tests/engine/test_export.py, registered-model test)",
    'medsam2 suggest --model models:/medsam2@champion --workdir "$MEDSAM2_HOME/work" --budget 20 --out queue --json':
        "needs the champion of `make demo` (tests/active/test_suggest.py runs suggest on a tiny checkpoint)",
    'medsam2 ingest queue-export.json --workdir "$MEDSAM2_HOME/work" --json':
        "the reader's Label Studio export (tests/active/test_labels_back.py ingests one made from a suggest queue)",
    'medsam2 ingest labelled-masks/ --labels --workdir "$MEDSAM2_HOME/work" --json':
        "the reader's folder of masks (tests/active/test_labels_back.py ingests one)",
    "medsam2 evaluate --model models:/medsam2@champion --review-below 0.7 --json":
        "needs the champion of `make demo` (tests/engine/test_failure_flags.py evaluates with flags)",
    "medsam2 predict scan1.png --model models:/medsam2@champion --calibration report/calibration.json --box "
    "40,30,200,180 --out preds":
        "needs the champion and its report (tests/engine/test_failure_flags.py predicts with a calibration)",
}

_BLOCK = re.compile(r"^```(?:bash|sh|shell|console)\s*\n(.*?)^```", re.MULTILINE | re.DOTALL)


def readme_commands(text: str) -> list[list[str]]:
    """The commands of each shell block: continuation lines joined, comments and blank lines dropped."""
    blocks = []
    for body in _BLOCK.findall(text):
        cmds, cur = [], ""
        for line in body.splitlines():
            line = re.sub(r"\s+#\s.*$", "", line).rstrip()  # a trailing comment ("# exit 2: …")
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            cur = f"{cur} {line.strip()}" if cur else line.strip()
            if cur.endswith("\\"):
                cur = cur[:-1].rstrip()
                continue
            cmds.append(re.sub(r"\s+", " ", cur))
            cur = ""
        blocks.append(cmds)
    return blocks


def test_every_readme_command_is_classified():
    blocks = readme_commands((REPO / "README.md").read_text())
    seen = [c for b in blocks for c in b]
    unclassified = [c for c in seen if c not in RUN and c not in SKIP]
    assert not unclassified, f"classify these README commands in tests/test_readme.py (RUN or SKIP): {unclassified}"
    stale = [c for c in (*RUN, *SKIP) if c not in seen]
    assert not stale, f"no longer in README.md, remove from tests/test_readme.py: {stale}"
    assert not set(RUN) & set(SKIP)


def test_readme_commands_run_as_written(tmp_path):
    if sample_root() is None:
        skip_or_fail("real sample data not found (MEDSAM2_SAMPLE_DATA)", GET_SAMPLE_DATA)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_"))}
    env.update(MEDSAM2_HOME=str(tmp_path / "home"), MEDSAM2_SAMPLE_DATA=str(sample_root()),
               MEDSAM2_SERVICE_TIMEOUT_S="3")
    for block in readme_commands((REPO / "README.md").read_text()):
        script = ["cd " + str(REPO)]
        for i, cmd in enumerate(block):
            if cmd in RUN:  # in one shell per block, so `source scripts/env.sh` holds for what follows
                script.append(f"{cmd} >\"$MEDSAM2_HOME/out{i}.txt\" 2>&1; echo \"__rc {i} $?\"")
        if len(script) == 1:
            continue
        (tmp_path / "home").mkdir(exist_ok=True)
        proc = subprocess.run(["bash", "-c", "\n".join(script)], env=env, capture_output=True, text=True,
                              timeout=1500)
        codes = dict(re.findall(r"^__rc (\d+) (\d+)$", proc.stdout, re.MULTILINE))
        for i, cmd in enumerate(block):
            if cmd not in RUN:
                continue
            out = (tmp_path / "home" / f"out{i}.txt")
            log = out.read_text()[-3000:] if out.exists() else proc.stderr[-3000:]
            assert codes.get(str(i)) == str(RUN[cmd]), f"{cmd!r} exited {codes.get(str(i))}:\n{log}"
            assert "Traceback" not in log, f"{cmd!r}:\n{log}"
