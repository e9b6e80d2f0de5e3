"""``medsam2 predict --volume`` on the shared volumes (issue 16): a NIfTI label volume with the source's shape
and affine, for a DICOM series also a DICOM-SEG referencing every slice of the series; one-line errors for a
slice outside the volume, a box outside the slice, a folder of two series. Weights: random init (64 px)."""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image
from typer.testing import CliRunner

from medsam2.cli import app
from medsam2.data.volumes import read_volume

runner = CliRunner()
CT = "totalsegmentator-examples/example_ct_sm.nii.gz"
SERIES = "dicom/totalsegmentator_ct_series"


def _invoke(*args: str):
    res = runner.invoke(app, ["predict", *args, "--json"])
    lines = [json.loads(line) for line in res.stdout.strip().splitlines() if line.startswith("{")]
    return res, (lines[-1] if lines else {})


def test_nifti_volume_gives_label_volume_with_source_geometry(sample_data, tiny_checkpoint, tmp_path):
    src = sample_data / CT
    res, out = _invoke("--model", str(tiny_checkpoint), "--volume", str(src), "--slice", "12",
                       "--box", "30,25,80,70", "--out", str(tmp_path))
    assert res.exit_code == 0, res.output
    assert out["random_init"] is True and out["prompted_slices"] == [12] and out["slices"] == 30
    assert "dicom_seg" not in out
    ref, got = nib.load(str(src)), nib.load(out["nifti"])
    assert got.shape == ref.shape and np.allclose(got.affine, ref.affine)
    data = np.asarray(got.dataobj)
    assert data.dtype == np.uint8 and set(np.unique(data)) <= {0, 1}
    # the labels are the slices' masks put back on the source grid: slice 12 of the RAS+ volume
    assert out["foreground_slices"] == int(data.any(axis=(0, 1)).sum())


def test_label_volume_round_trips_to_a_non_ras_source(sample_data, tmp_path):
    """The MR example is LPS: labels on the RAS+ display slices must land on the file's own voxels."""
    src = sample_data / "totalsegmentator-examples/example_mr_sm.nii.gz"
    vol = read_volume(src)
    assert nib.aff2axcodes(nib.load(str(src)).affine) != ("R", "A", "S")
    from medsam2.data.volumes import read_nifti_labels

    lab = read_nifti_labels(sample_data / "totalsegmentator-examples/example_seg_mr.nii.gz", vol) > 0
    path = vol.write_nifti(lab, tmp_path / "mr.nii.gz")
    want = np.asarray(nib.load(str(sample_data / "totalsegmentator-examples/example_seg_mr.nii.gz")).dataobj) > 0
    got = nib.load(str(path))
    assert np.array_equal(np.asarray(got.dataobj) > 0, want) and np.allclose(got.affine, vol.affine)


def test_dicom_series_gives_nifti_and_dicom_seg_referencing_it(sample_data, tiny_checkpoint, tmp_path):
    import highdicom as hd

    src = sample_data / SERIES
    files = sorted(src.iterdir())
    key = tmp_path / "key.png"
    m = np.zeros((512, 512), np.uint8)
    m[200:300, 180:320] = 255
    Image.fromarray(m).save(key)
    res, out = _invoke("--model", str(tiny_checkpoint), "--volume", str(src), "--slice", "3", "--slice", "15",
                       "--mask", str(key), "--out", str(tmp_path / "o"))
    assert res.exit_code == 0, res.output
    assert out["shape"] == [512, 512, 20] and out["prompted_slices"] == [3, 15]
    nii = nib.load(out["nifti"])
    assert nii.shape == (512, 512, 20)
    # the affine maps voxel (0, 0, k) to slice k's ImagePositionPatient (LPS → RAS), in position order
    heads = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    pos = sorted(([float(v) for v in h.ImagePositionPatient] for h in heads), key=lambda p: p[2])
    for k in (0, 7, 19):
        ras = nii.affine @ np.array([0, 0, k, 1.0])
        assert np.allclose(ras[:3], [-pos[k][0], -pos[k][1], pos[k][2]], atol=1e-3)
    assert np.allclose(nib.affines.voxel_sizes(nii.affine), [0.9765625, 0.9765625, 2.0])
    # the prompted mask slices come back (SAM2 uses a mask prompt as the slice's output), transposed to (X, Y)
    data = np.asarray(nii.dataobj)
    assert data[:, :, 3].T[250, 250] == 1 and data[:, :, 3].T[50, 50] == 0
    seg = hd.seg.segread(out["dicom_seg"])
    series_uid = heads[0].SeriesInstanceUID
    assert seg.number_of_frames == 20 and seg.SeriesInstanceUID != series_uid
    assert [s.SeriesInstanceUID for s in seg.ReferencedSeriesSequence] == [series_uid]
    refs = {i.ReferencedSOPInstanceUID for i in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert refs == {str(h.file_meta.MediaStorageSOPInstanceUID) for h in heads}  # body UIDs are blank here
    assert seg.pixel_array.shape[-2:] == (512, 512)


@pytest.mark.parametrize("args, message", [
    (["--slice", "30", "--box", "30,25,80,70"], "--slice 30 is outside the volume: it has 30 slices (0..29)"),
    (["--slice", "3", "--box", "300,25,380,70"], "lies outside the 122×101 image"),
    (["--slice", "3"], "needs a prompt on each --slice"),
    (["--box", "30,25,80,70"], "needs --slice Z"),
    (["--slice", "3", "--slice", "4", "--box", "1,1,9,9", "--box", "1,1,9,9", "--box", "1,1,9,9"],
     "--box is given 3 times for 2 --slice values"),
    (["--slice", "3", "--box", "1,1,9,9", "--engine", "onnx"], "--engine onnx has no memory path"),
    (["--slice", "3", "--box", "1,1,9,9", "--precision", "int8"], "--precision int8 is for 2-D images"),
    (["--slice", "3", "--slice", "3", "--box", "1,1,9,9"], "--slice repeats a slice"),
])
def test_bad_volume_prompts_are_one_line_usage_errors(sample_data, tiny_checkpoint, tmp_path, args, message):
    res, out = _invoke("--model", str(tiny_checkpoint), "--volume", str(sample_data / CT), *args,
                       "--out", str(tmp_path))
    assert res.exit_code == 2, res.output
    assert message in out["error"] and "Traceback" not in res.output


def test_folder_of_two_series_names_them_and_how_to_choose(sample_data, tiny_checkpoint, tmp_path):
    two = tmp_path / "two"
    shutil.copytree(sample_data / SERIES, two)
    other = sorted(two.iterdir())[:3]
    for f in other:  # a second series: the same slices under another SeriesInstanceUID
        ds = pydicom.dcmread(f)
        ds.SeriesInstanceUID, ds.SeriesNumber = "1.2.3.4.5", 77
        ds.save_as(f)
    res, out = _invoke("--model", str(tiny_checkpoint), "--volume", str(two), "--slice", "1",
                       "--box", "200,200,300,300", "--out", str(tmp_path / "o"))
    assert res.exit_code == 3, res.output
    assert "holds 2 DICOM series" in out["error"] and "1.2.3.4.5 (SeriesNumber 77, CT, 3 files)" in out["error"]
    assert "--series" in out["hint"]
    res, out = _invoke("--model", str(tiny_checkpoint), "--volume", str(two), "--series", "77", "--slice", "1",
                       "--box", "200,200,300,300", "--out", str(tmp_path / "o"))
    assert res.exit_code == 0, res.output
    assert out["shape"] == [512, 512, 3]
