"""The served model takes volumes too (issue 16): a NIfTI file or a ZIP of a DICOM series in the request, prompts
on one or more slices, SAM2's memory through the volume; the answer is the same label volume ``medsam2 predict
--volume`` writes (the source's shape and affine; a DICOM-SEG referencing the series for DICOM). Bad volumes and
prompts get one sentence each with a 4xx status, never a server path. Weights: random init (64 px)."""

from __future__ import annotations

import base64
import gzip
import io
import zipfile

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image

from medsam2.engine.checkpoint import load_model
from medsam2.engine.serve import RequestError, ServeLimits, serve
from medsam2.predict_volume import predict_volume

CT = "totalsegmentator-examples/example_ct_sm.nii.gz"
SERIES = "dicom/totalsegmentator_ct_series"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _zip(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _series_zip(sample_data, edit=None) -> bytes:
    files = {}
    for i, f in enumerate(sorted((sample_data / SERIES).iterdir())):
        if edit is None or not edit(i):
            files[f"series/{f.name}"] = f.read_bytes()
            continue
        ds = pydicom.dcmread(f)
        ds.SeriesInstanceUID, ds.SeriesNumber = "1.2.3.4.5", 77
        buf = io.BytesIO()
        ds.save_as(buf)
        files[f"series/{f.name}"] = buf.getvalue()
    return _zip(files)


@pytest.fixture(scope="module")
def net(tiny_checkpoint):
    model, _ = load_model(tiny_checkpoint)
    return model


def _nifti(result) -> nib.Nifti1Image:
    return nib.Nifti1Image.from_bytes(gzip.decompress(base64.b64decode(result.volume)))


def test_served_nifti_volume_equals_predict_volume(sample_data, net, tiny_checkpoint, tmp_path):
    src = sample_data / CT
    image = {"image": _b64((sample_data / "kvasir-seg/images").glob("*.jpg").__next__().read_bytes()),
             "box": [40, 30, 200, 180]}
    rec = {"volume": _b64(src.read_bytes()), "prompts": [{"slice": 12, "box": [30, 25, 80, 70]},
                                                         {"slice": 20, "points": [[60, 50]], "point_labels": [1]}]}
    out = serve(net, "box", [image, rec], {"format": "rle"})
    assert [r.format for r in out] == ["rle", "nifti"]  # the records' order, each its own kind
    res = out[1]
    assert res.iou_pred is None and res.dicom_seg is None and res.mask is None
    ref, got = nib.load(str(src)), _nifti(res)
    assert list(got.shape) == res.shape == list(ref.shape) and np.allclose(got.affine, ref.affine)
    cli = predict_volume(str(tiny_checkpoint), src, [12, 20], tmp_path, boxes=["30,25,80,70", ""],
                         points=["", "60,50,1"])
    want = np.asarray(nib.load(cli["nifti"]).dataobj)
    assert np.array_equal(np.asarray(got.dataobj), want)  # what the CLI writes, voxel for voxel
    assert res.foreground_slices == cli["foreground_slices"]


def test_served_dicom_series_zip_gives_a_seg_referencing_it(sample_data, net):
    import highdicom as hd

    heads = [pydicom.dcmread(f, stop_before_pixels=True) for f in sorted((sample_data / SERIES).iterdir())]
    key = np.zeros((512, 512), np.uint8)
    key[200:300, 180:320] = 255
    buf = io.BytesIO()
    Image.fromarray(key).save(buf, format="PNG")
    rec = {"volume": _b64(_series_zip(sample_data)), "prompts": [{"slice": 3, "mask": _b64(buf.getvalue())}]}
    (res,) = serve(net, "box", [rec], None)
    assert res.shape == [512, 512, 20] and (res.height, res.width) == (512, 512)
    data = np.asarray(_nifti(res).dataobj)
    assert data[:, :, 3].T[250, 250] == 1 and data[:, :, 3].T[50, 50] == 0  # the mask prompt is slice 3's output
    seg = hd.seg.segread(io.BytesIO(base64.b64decode(res.dicom_seg)))
    assert seg.number_of_frames == 20
    assert [s.SeriesInstanceUID for s in seg.ReferencedSeriesSequence] == [heads[0].SeriesInstanceUID]
    refs = {i.ReferencedSOPInstanceUID for i in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert refs == {str(h.file_meta.MediaStorageSOPInstanceUID) for h in heads}


def _refused(net, records, limits=ServeLimits()) -> RequestError:
    with pytest.raises(RequestError) as e:
        serve(net, "box", records, None, limits)
    return e.value


@pytest.mark.parametrize("prompts, message", [
    (None, "record 0: prompts required for a volume"),
    ([{"slice": 30, "box": [30, 25, 80, 70]}], "prompts[0]: slice 30 is outside the volume: it has 30 slices"),
    ([{"slice": 3, "box": [300, 25, 380, 70]}],
     "prompts[0]: box [300.0, 25.0, 380.0, 70.0] lies outside the 122×101 image"),
    ([{"slice": 3}], "prompts[0]: give box, points or mask"),
    ([{"slice": 3, "box": [1, 1, 9, 9]}, {"slice": 3, "box": [1, 1, 9, 9]}], "prompts[1]: slice 3 is prompted twice"),
    ([{"slice": 3, "points": [[5, 5]], "point_labels": [2]}], "point_labels must hold one 0 or 1 per point"),
    ([{"slice": 3, "mask": _b64(b"not a png")}], "prompts[0]: mask is not base64 of a PNG"),
])
def test_bad_volume_prompts_get_one_sentence(sample_data, net, prompts, message):
    err = _refused(net, [{"volume": _b64((sample_data / CT).read_bytes()), "prompts": prompts}])
    assert err.status == 422 and message in err.message, err.message


def test_bad_volumes_and_limits(sample_data, net):
    good = [{"slice": 1, "box": [200, 200, 300, 300]}]
    err = _refused(net, [{"volume": _b64(b"just some bytes, not a volume"), "prompts": good}])
    assert err.status == 422 and "not a NIfTI file (.nii/.nii.gz) or a ZIP of a DICOM series" in err.message
    err = _refused(net, [{"volume": _b64(_zip({"readme.txt": b"hello"})), "prompts": good}])
    assert err.status == 422 and "holds no DICOM image slices" in err.message and "/tmp" not in err.message
    err = _refused(net, [{"volume": _b64((sample_data / CT).read_bytes()), "image": "eA==", "prompts": good}])
    assert "give an image or a volume, not both" in err.message
    err = _refused(net, [{"volume": _b64((sample_data / CT).read_bytes()), "prompts": good}],
                   ServeLimits(max_voxels=100_000))  # checked from the header, before the voxels are decoded
    assert err.status == 413 and "MEDSAM2_SERVE_MAX_VOXELS" in err.message


def test_zip_of_two_series_names_them_and_the_field_that_chooses(sample_data, net):
    two = _series_zip(sample_data, edit=lambda i: i < 3)
    good = [{"slice": 1, "box": [200, 200, 300, 300]}]
    err = _refused(net, [{"volume": _b64(two), "prompts": good}])
    assert err.status == 422 and "holds 2 DICOM series" in err.message, err.message
    assert "1.2.3.4.5 (SeriesNumber 77, CT, 3 files)" in err.message and "'series'" in err.message
    assert "/tmp" not in err.message and "medsam2-serve" not in err.message
    (res,) = serve(net, "box", [{"volume": _b64(two), "series": "77", "prompts": good}], None)
    assert res.shape == [512, 512, 3]


@pytest.mark.slow  # logs a model to MLflow and loads it back as a pyfunc
def test_mlflow_pyfunc_takes_a_volume(sample_data, tiny_checkpoint, tracking_env):
    import mlflow

    from medsam2 import tracking
    from medsam2.config import ExperimentCfg, ModelCfg

    tracking.setup(ExperimentCfg(model=ModelCfg(image_size=64)))
    with mlflow.start_run():
        uri = tracking.log_model(tiny_checkpoint)
    sig = mlflow.models.get_model_info(uri).signature
    assert all(f"{k}: " in str(sig.inputs) for k in ("volume", "series", "prompts", "slice"))
    model = mlflow.pyfunc.load_model(uri)
    src = sample_data / CT
    (res,) = model.predict([{"volume": _b64(src.read_bytes()), "prompts": [{"slice": 12, "box": [30, 25, 80, 70]}]}])
    assert res.format == "nifti" and res.shape == list(nib.load(str(src)).shape)
    assert np.allclose(_nifti(res).affine, nib.load(str(src)).affine)
