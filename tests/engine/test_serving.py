"""Serving the champion over HTTP safely (issue 19): images travel in the request, server paths only under an
allowed root, every refusal is one sentence with its own 4xx status and no traceback, and the served masks are
``medsam2 predict``'s.

The request checks are tested in-process (fast); ``test_served_champion_over_http`` starts the real ``mlflow
models serve`` twice on loopback (without and with an image root) with a registered champion."""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medsam2.engine.serve import (
    RequestError,
    ServeLimits,
    decode_mask,
    encode_mask,
    load_records,
    output_format,
)

REPO = Path(__file__).resolve().parents[2]


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


IMG = np.random.default_rng(0).integers(0, 255, (48, 60, 3), dtype=np.uint8)
GOOD = {"image": _b64(_png(IMG)), "box": [8, 6, 50, 40]}


def _refused(records, prompt="box", limits=ServeLimits()) -> RequestError:
    with pytest.raises(RequestError) as e:
        load_records(records, prompt, limits)
    return e.value


@pytest.mark.parametrize("records,status,message", [
    ([{"image": GOOD["image"]}], 422, "record 0: box required for a box-prompted model"),
    ([GOOD, {"image": "not base64!"}], 422, "record 1: image is not valid base64"),
    ([{"image": _b64(b"%PDF-1.4 hello"), "box": [1, 2, 3, 4]}], 422,
     "record 0: image is not a PNG, JPEG, TIFF or DICOM file"),
    ([{"image": _b64(_png(IMG)[:40]), "box": [1, 2, 3, 4]}], 422, "record 0: image could not be"),
    ([{"box": [1, 2, 3, 4]}], 422, "record 0: image required"),
    ([{**GOOD, "image_path": "a.png"}], 422, "record 0: give image or image_path, not both"),
    ([{**GOOD, "box": [1, 2, 3]}], 422, "record 0: box must be 4 finite numbers"),
    ([{**GOOD, "box": [50, 6, 8, 40]}], 422, "record 0: box [50.0, 6.0, 8.0, 40.0] is empty"),
    ([{**GOOD, "box": [100, 100, 200, 200]}], 422, "lies outside the 60×48 image"),
    ([], 422, "inputs: the request holds no records"),
])
def test_bad_requests_get_one_sentence_each(records, status, message):
    err = _refused(records)
    assert err.status == status and message in err.message, (err.status, err.message)
    assert "\n" not in err.message and "Traceback" not in err.message


def test_point_prompts_are_checked():
    assert _refused([{"image": GOOD["image"]}], "points").message.startswith(
        "record 0: points and point_labels required")
    err = _refused([{"image": GOOD["image"], "points": [[5, 5], [9, 9]], "point_labels": [1]}], "points")
    assert "one 0 (background) or 1 (foreground) per point (2 points, 1 labels)" in err.message
    recs, imgs = load_records([{"image": GOOD["image"]}], "none", ServeLimits())  # prompt-free: no prompt needed
    assert imgs[0].shape == (48, 60, 3)


def test_limits_answer_413():
    big = _png(np.zeros((600, 500), np.uint8))
    err = _refused([{"image": _b64(big), "box": [1, 1, 9, 9]}], limits=ServeLimits(max_pixels=200_000))
    assert err.status == 413 and err.message == (
        "record 0: image is 500x600 = 0.3 megapixels; this server takes at most 0.2 (MEDSAM2_SERVE_MAX_PIXELS)")
    err = _refused([GOOD] * 3, limits=ServeLimits(max_records=2))
    assert err.status == 413 and "3 records in one request; this server takes at most 2" in err.message
    err = _refused([GOOD] * 2, limits=ServeLimits(max_bytes=len(GOOD["image"]) // 2))
    assert err.status == 413 and "MiB of images in one request" in err.message
    with pytest.raises(RequestError, match="params.format must be one of png, rle"):
        output_format({"format": "jpeg"})


def test_limits_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("MEDSAM2_SERVE_MAX_RECORDS", "4")
    monkeypatch.setenv("MEDSAM2_SERVE_MAX_PIXELS", "1e6")
    monkeypatch.setenv("MEDSAM2_SERVE_IMAGE_ROOT", str(tmp_path))
    lim = ServeLimits.from_env()
    assert (lim.max_records, lim.max_pixels, lim.image_root) == (4, 1_000_000, tmp_path.resolve())
    monkeypatch.setenv("MEDSAM2_SERVE_MAX_RECORDS", "many")
    with pytest.raises(ValueError, match="MEDSAM2_SERVE_MAX_RECORDS='many' is not a number"):
        ServeLimits.from_env()


def test_image_path_only_under_the_allowed_root(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "sub").mkdir(parents=True)
    outside.mkdir()
    (root / "sub" / "a.png").write_bytes(_png(IMG))
    (outside / "secret.png").write_bytes(_png(IMG))
    (root / "escape.png").symlink_to(outside / "secret.png")
    (root / "inner.png").symlink_to(root / "sub" / "a.png")
    lim = ServeLimits(image_root=root.resolve())

    def refused(path, limits=lim):
        return _refused([{"image_path": path, "box": [8, 6, 50, 40]}], limits=limits)

    for ok in ("sub/a.png", str(root / "sub" / "a.png"), "inner.png"):
        _, imgs = load_records([{"image_path": ok, "box": [8, 6, 50, 40]}], "box", lim)
        np.testing.assert_array_equal(imgs[0], IMG)
    assert (refused("sub/../sub/a.png").status, refused("sub/../sub/a.png").message) == (
        403, "record 0: image_path may not contain '..'")
    for bad in (str(outside / "secret.png"), "escape.png", "/etc/passwd"):
        err = refused(bad)
        assert (err.status, err.message) == (403, "record 0: image_path is outside the allowed image root"), bad
    err = refused("missing.png")
    assert (err.status, err.message) == (422, "record 0: image_path names no file under the allowed image root")
    err = refused("sub/a.png", ServeLimits())
    assert err.status == 403 and err.message.startswith("record 0: image_path is disabled on this server")
    for e in (refused(str(outside / "secret.png")), refused("missing.png")):
        assert str(tmp_path) not in e.message  # no server path in an answer


@pytest.mark.parametrize("fmt", ["png", "rle"])
def test_mask_encodings_round_trip(fmt):
    m = np.zeros((37, 53), bool)
    m[3:20, 5:40] = True
    enc = {k: v.model_dump() if hasattr(v, "model_dump") else v for k, v in encode_mask(m, fmt).items()}
    np.testing.assert_array_equal(decode_mask(json.loads(json.dumps(enc))), m)


# ------------------------------------------------------------------------------------------- the real server

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(port: int, body: dict | bytes) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=data,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


class _Server:
    """``mlflow models serve`` on loopback; stopped (process group) on exit."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.port = _free_port()
        self.log = log
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/medsam2@champion", "--env-manager",
             "local", "-h", "127.0.0.1", "-p", str(self.port)],
            env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)

    def __enter__(self) -> _Server:
        deadline = time.time() + 300
        while time.time() < deadline:
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/ping", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(1)
        raise AssertionError("server did not start: " + self.log.read_text()[-3000:])

    def __exit__(self, *exc) -> None:
        import signal

        os.killpg(self.proc.pid, signal.SIGTERM)
        self.proc.wait(timeout=60)


def _clean(body: dict, *paths: Path) -> None:
    """No traceback and no server path in a response body."""
    text = json.dumps(body)
    assert "Traceback" not in text and "stack_trace" not in body and 'File "' not in text, text[:2000]
    for p in (*paths, REPO, Path(sys.prefix)):
        assert str(p) not in text, (str(p), text[:2000])


@pytest.mark.slow  # two `mlflow models serve` processes and one `medsam2 predict`
def test_served_champion_over_http(tmp_path, tracking_env, sample_data):
    import mlflow

    from medsam2 import tracking
    from medsam2.config import ExperimentCfg, ModelCfg
    from medsam2.data.readers import read_raster
    from medsam2.engine.checkpoint import atomic_save, build_model, model_payload

    cfg = ExperimentCfg(model=ModelCfg(image_size=64))
    model, base = build_model(cfg.model)
    ckpt = atomic_save(model_payload(model, cfg, base), tmp_path / "final.pt")
    tracking.setup(cfg)
    with mlflow.start_run():
        uri = tracking.log_model(ckpt)
    mv = mlflow.register_model(uri, "medsam2")
    tracking._client().set_registered_model_alias("medsam2", "champion", mv.version)
    sig = mlflow.models.get_model_info("models:/medsam2@champion").signature
    assert sig.params is not None and "format" in [p.name for p in sig.params.params]  # the UI shows the schema
    assert all(f"{k}: " in str(sig.inputs) for k in ("image", "box", "points", "point_labels", "image_path"))

    stem = sorted((sample_data / "kvasir-seg" / "images").glob("*.jpg"))[0].stem
    jpg = sample_data / "kvasir-seg" / "images" / f"{stem}.jpg"
    gt = read_raster(sample_data / "kvasir-seg" / "masks" / f"{stem}.jpg", as_mask=True)
    ys, xs = np.nonzero(gt if gt.ndim == 2 else gt[..., 0] > 127)
    kbox = [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]
    dcm = sample_data / "dicom" / "pydicom" / "CT_small.dcm"
    dbox = [30.0, 40.0, 90.0, 100.0]
    root = tmp_path / "images"
    root.mkdir()
    (root / "polyp.jpg").write_bytes(jpg.read_bytes())
    (tmp_path / "outside.png").write_bytes(_png(IMG))

    # the CLI's masks on the same files and boxes
    prompts = tmp_path / "prompts.csv"
    prompts.write_text(f'image,box\n{jpg},"{",".join(map(str, kbox))}"\n{dcm},"{",".join(map(str, dbox))}"\n')
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking.tracking_uri(), "MEDSAM2_SERVE_MAX_PIXELS": "3000000",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}  # uvicorn
    cli = subprocess.run([sys.executable, "-m", "medsam2.cli", "predict", "--prompts", str(prompts), "--model",
                          "models:/medsam2@champion", "--out", str(tmp_path / "cli"), "--json"],
                         capture_output=True, text=True, timeout=600, env=env)
    assert cli.returncode == 0, cli.stderr[-3000:]
    expected = [np.asarray(Image.open(o["mask_png"])) > 127 for o in json.loads(cli.stdout)["outputs"]]

    rec_jpg = {"image": _b64(jpg.read_bytes()), "box": kbox}
    rec_dcm = {"image": _b64(dcm.read_bytes()), "box": dbox}
    with _Server(env, tmp_path / "serve.log") as srv:
        status, body = _post(srv.port, {"inputs": [rec_jpg, rec_dcm]})
        assert status == 200, body
        _clean(body, tmp_path)
        preds = body["predictions"]
        assert [p["format"] for p in preds] == ["png", "png"]
        for p, want in zip(preds, expected, strict=True):
            assert (p["height"], p["width"]) == want.shape and 0 <= p["iou_pred"] <= 1
            np.testing.assert_array_equal(decode_mask(p), want)
        status, body = _post(srv.port, {"inputs": [rec_dcm], "params": {"format": "rle"}})
        assert status == 200 and body["predictions"][0]["rle"]["size"] == list(expected[1].shape)
        np.testing.assert_array_equal(decode_mask(body["predictions"][0]), expected[1])

        big = _b64(_png(np.zeros((2000, 1600), np.uint8)))
        bad = [
            ({"inputs": [{"image": rec_jpg["image"]}]}, 422,
             "record 0: box required for a box-prompted model ([x0, y0, x1, y1] in pixels)"),
            ({"inputs": [rec_jpg, {"image": _b64(b"\x89PNG\r\n\x1a\n garbage"), "box": kbox}]}, 422,
             "record 1: image could not be read as PNG"),
            ({"inputs": [{"image": big, "box": [1, 1, 9, 9]}]}, 413,
             "record 0: image is 1600x2000 = 3.2 megapixels; this server takes at most 3.0 "
             "(MEDSAM2_SERVE_MAX_PIXELS)"),
            ({"inputs": [{"image_path": str(root / "polyp.jpg"), "box": kbox}]}, 403,
             "record 0: image_path is disabled on this server; send the file's bytes as base64 in 'image'"),
            ({"inputs": [rec_jpg], "params": {"format": "gif"}}, 422,
             "params.format must be one of png, rle, not 'gif'"),
        ]
        for req, want_status, want_msg in bad:
            status, body = _post(srv.port, req)
            assert (status, body.get("message")) == (want_status, want_msg), body
            _clean(body, tmp_path, root)

    with _Server({**env, "MEDSAM2_SERVE_IMAGE_ROOT": str(root)}, tmp_path / "serve-root.log") as srv:
        status, body = _post(srv.port, {"inputs": [{"image_path": "polyp.jpg", "box": kbox}]})
        assert status == 200, body
        np.testing.assert_array_equal(decode_mask(body["predictions"][0]), expected[0])
        for path in (str(tmp_path / "outside.png"), "/etc/passwd", "../outside.png"):
            status, body = _post(srv.port, {"inputs": [{"image_path": path, "box": kbox}]})
            assert status == 403 and body["message"] in (
                "record 0: image_path is outside the allowed image root",
                "record 0: image_path may not contain '..'"), body
            _clean(body, tmp_path, root)
    assert "Traceback" not in (tmp_path / "serve.log").read_text()  # refusals are not server errors
