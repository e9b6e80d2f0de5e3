"""`medsam2 predict`: PNG masks for images, a DICOM-SEG for DICOM input that highdicom reads back."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from medsam2.predict_files import parse_points


def test_parse_points():
    pts, labels = parse_points("10,20;30,40,0")
    assert pts.tolist() == [[10, 20], [30, 40]] and labels.tolist() == [1, 0]
    with pytest.raises(ValueError):
        parse_points("1")


def test_predict_png_and_dicom_seg(sample_data, tiny_checkpoint, tmp_path):
    import highdicom as hd
    import pydicom

    ct = sample_data / "dicom" / "pydicom" / "CT_small.dcm"
    png = tmp_path / "img.png"
    Image.fromarray(np.full((50, 70, 3), 120, np.uint8)).save(png)
    out = subprocess.run([sys.executable, "-m", "medsam2.cli", "predict", str(png), str(ct), "--model",
                          str(tiny_checkpoint), "--out", str(tmp_path / "out"), "--box", "10,10,40,40", "--json"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(res["outputs"]) == 2
    mask = np.array(Image.open(res["outputs"][0]["mask_png"]))
    assert mask.shape == (50, 70) and set(np.unique(mask)) <= {0, 255}
    seg_path = res["outputs"][1]["dicom_seg"]
    seg = hd.seg.segread(seg_path)
    src = pydicom.dcmread(ct)
    assert seg.Rows == src.Rows and seg.Columns == src.Columns
    assert seg.StudyInstanceUID == src.StudyInstanceUID
    refs = [i.ReferencedSOPInstanceUID for s in seg.ReferencedSeriesSequence for i in s.ReferencedInstanceSequence]
    assert src.SOPInstanceUID in refs
    assert seg.get_segment_numbers() == [1]
