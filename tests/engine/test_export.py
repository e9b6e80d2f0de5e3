"""`medsam2 export --format onnx` and `medsam2 predict --engine onnx`: ONNX Runtime reproduces the PyTorch model
(logits within 1e-3 of fp32, same masks through the CLI), the batch and point axes are dynamic, a registered
model gets its export logged beside it, and a broken or mismatched export directory is refused clearly."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medsam2.config import ExperimentCfg, ModelCfg
from medsam2.engine.checkpoint import atomic_save, build_model, model_payload
from medsam2.engine.export import OnnxEngine, _example, export_onnx
from medsam2.engine.predict import FeatureCache, TorchEngine, decode_features, predict
from medsam2.metrics import segmentation_metrics

S = 64
# the demo's prompt path: box prompt + box raster, ellipse prior, box-centred crop, flip TTA
DEMO_LIKE = dict(image_size=S, prompt="box", box_mask=True, box_prior="ellipse", box_crop=0.25, tta_flip=True)


def _perturbed(cfg: ExperimentCfg, seed: int = 0):
    """A model whose trainable weights moved off their init (the prior's correction is zero at init, which
    would make any export look exact)."""
    model, base = build_model(cfg.model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval(), base


def _cli(*args: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "medsam2.cli", *args], capture_output=True, text=True,
                          timeout=600, cwd=cwd, env=env)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(model, checkpoint, export dir with int8 graphs) of a perturbed demo-like model, exported by the CLI."""
    d = tmp_path_factory.mktemp("export")
    cfg = ExperimentCfg(model=ModelCfg(**DEMO_LIKE))
    model, base = _perturbed(cfg)
    ckpt = atomic_save(model_payload(model, cfg, base), d / "final.pt")
    out = _cli("export", "--model", str(ckpt), "--format", "onnx", "--quantize", "int8", "--out", str(d / "onnx"),
               "--json")
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["files"] == ["decoder.int8.onnx", "decoder.onnx", "encoder.int8.onnx", "encoder.onnx"]
    assert res["parity_fp32"]["logits_max_abs"] <= 1e-3 and res["quantized"] == "int8"
    yield model, ckpt, d / "onnx"
    shutil.rmtree(d, ignore_errors=True)


def test_onnx_logits_match_pytorch_fp32_at_another_batch_size(exported):
    model, _, d = exported
    eng = OnnxEngine(d)
    for batch in (1, 5):  # traced at 2: the batch axis is dynamic
        x, kw = _example(model, batch, seed=7)
        with torch.no_grad():
            want = decode_features(model, model.encode(x), x, kw)
        got = eng.decode(eng.encode(x), x, kw)
        assert got[0].shape == want[0].shape and float(want[0].std()) > 0.1  # non-trivial logits
        assert float((got[0] - want[0]).abs().max()) <= 1e-3
        assert float((got[1] - want[1]).abs().max()) <= 1e-3
        assert float((got[2] - want[2]).abs().max()) <= 1e-4  # the box prior, computed in the graph


def test_cli_predict_engine_onnx_gives_the_pytorch_masks(exported, sample_data, tmp_path):
    _, ckpt, d = exported
    img = sorted((sample_data / "kvasir-seg" / "images").glob("*.jpg"))[0]
    w, h = Image.open(img).size
    box = f"{w // 4},{h // 4},{3 * w // 4},{3 * h // 4}"
    masks = {}
    for name, model, extra in (("torch", str(ckpt), ("--precision", "fp32")), ("onnx", str(d), ("--engine", "onnx")),
                               ("int8", str(d), ("--engine", "onnx", "--precision", "int8")),
                               ("torch-int8", str(ckpt), ("--precision", "int8"))):
        out = _cli("predict", str(img), "--model", model, "--box", box, "--out", str(tmp_path / name), "--json",
                   *extra)
        assert out.returncode == 0, out.stderr[-3000:]
        res = json.loads(out.stdout.strip().splitlines()[-1])
        assert res["outputs"][0]["status"] == "ok", res
        masks[name] = np.array(Image.open(res["outputs"][0]["mask_png"])) > 0
    assert masks["torch"].shape == (h, w) and 0 < masks["torch"].mean() < 1
    assert (masks["onnx"] != masks["torch"]).mean() < 1e-4  # a pixel at p≈0.5 may flip
    assert segmentation_metrics(masks["int8"], masks["torch"])["dice"] > 0.95
    assert segmentation_metrics(masks["torch-int8"], masks["torch"])["dice"] > 0.95  # the int8 twin's


def test_broken_or_mismatched_exports_are_refused_clearly(exported, sample_data, tmp_path):
    _, ckpt, d = exported
    img = sorted((sample_data / "kvasir-seg" / "images").glob("*.jpg"))[0]

    def predict_with(model: Path | str, *extra: str) -> str:
        out = _cli("predict", str(img), "--model", str(model), "--box", "10,10,200,200", "--out",
                   str(tmp_path / "o"), "--engine", "onnx", *extra)
        assert out.returncode == 3, (out.returncode, out.stderr[-2000:])
        assert "Traceback" not in out.stderr
        return out.stderr

    assert "has no export.json" in predict_with(tmp_path)  # an empty folder
    missing = shutil.copytree(d, tmp_path / "missing")
    (missing / "decoder.onnx").unlink()
    assert "lacks decoder.onnx" in predict_with(missing)
    changed = shutil.copytree(d, tmp_path / "changed")
    shutil.copy(d / "encoder.int8.onnx", changed / "encoder.onnx")  # another model's graph under the name
    assert "does not match the exported model" in predict_with(changed)
    assert "--engine onnx takes an export directory" in predict_with(ckpt)
    fp32_only = shutil.copytree(d, tmp_path / "fp32")
    manifest = json.loads((fp32_only / "export.json").read_text())
    manifest.pop("quantized")
    (fp32_only / "export.json").write_text(json.dumps(manifest))
    assert "has no int8 graphs" in predict_with(fp32_only, "--precision", "int8")
    # export refuses to write into a folder that holds something else
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    out = _cli("export", "--model", str(ckpt), "--out", str(tmp_path / "busy"))
    assert out.returncode == 3 and "is not an ONNX export" in out.stderr and "Traceback" not in out.stderr
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"


@pytest.mark.slow  # one more export (~1 min)
def test_points_and_the_multiscale_decoder_export_with_a_dynamic_point_count(tmp_path):
    cfg = ExperimentCfg(model=ModelCfg(image_size=S, prompt="points", decoder="multiscale", tta_flip=True))
    model, _ = _perturbed(cfg, seed=3)
    export_onnx(model, cfg, tmp_path / "onnx", source="test")
    eng = OnnxEngine(tmp_path / "onnx")
    assert "image" in eng.inputs and "points" in eng.inputs
    for n_points in (1, 4):
        x, _ = _example(model, 2, seed=n_points)
        g = torch.Generator().manual_seed(n_points)
        kw = {"points": torch.rand(2, n_points, 2, generator=g) * S,
              "point_labels": torch.randint(0, 2, (2, n_points), generator=g)}
        with torch.no_grad():
            want = decode_features(model, model.encode(x), x, kw)
        got = eng.decode(eng.encode(x), x, kw)
        assert float((got[0] - want[0]).abs().max()) <= 1e-3


class _Counting(TorchEngine):
    """The PyTorch engine, counting the images its encoder runs on."""

    def __init__(self, model):
        super().__init__(model)
        self.encoded = 0

    def encode(self, x, precision="fp32"):
        self.encoded += x.shape[0]
        return super().encode(x, precision)


def test_one_image_with_several_prompts_is_encoded_once():
    cfg = ExperimentCfg(model=ModelCfg(image_size=S, prompt="box", box_mask=True, tta_flip=True))
    model, _ = _perturbed(cfg, seed=1)
    img = np.random.default_rng(0).integers(0, 255, (90, 120, 3), dtype=np.uint8)
    boxes = [np.array(b, np.float32) for b in ([5, 5, 60, 50], [30, 20, 110, 85], [0, 0, 119, 89])]
    eng = _Counting(model)
    together = predict(eng, [img] * 3, boxes=boxes, precision="fp32")
    assert eng.encoded == 2  # the image and its mirror image (flip TTA), once for three boxes
    alone = [predict(model, [img], boxes=[b], precision="fp32")[0] for b in boxes]
    for a, b in zip(together, alone, strict=True):
        np.testing.assert_allclose(a.prob, b.prob, atol=1e-5)
    assert not np.array_equal(together[0].mask, together[1].mask)  # the prompts do matter

    cache = FeatureCache(size=2)  # across calls: a second prompt on the same image runs the decoder only
    eng.encoded = 0
    predict(eng, [img], boxes=boxes[:1], cache=cache)
    predict(eng, [img.copy()], boxes=boxes[1:2], cache=cache)
    assert eng.encoded == 2 and cache.hits == 2


@pytest.mark.slow  # an MLflow model registered twice, one export, three CLI processes
def test_export_of_a_registered_model_is_logged_beside_it(exported, tracking_env, sample_data, tmp_path):
    import mlflow

    from medsam2 import tracking

    _, ckpt, _ = exported
    tracking.setup(ExperimentCfg(model=ModelCfg(image_size=S)))
    versions = []
    for _ in range(2):
        with mlflow.start_run():
            uri = tracking.log_model(ckpt)
        versions.append(mlflow.register_model(uri, "medsam2"))
    client = tracking._client()
    client.set_registered_model_alias("medsam2", "champion", versions[0].version)

    out = _cli("export", "--model", "models:/medsam2@champion", "--out", str(tmp_path / "onnx"), "--json")
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    v1 = f"models:/medsam2/{versions[0].version}"
    assert res["source"] == v1 and res["logged"]["model_version"] == v1  # the alias, resolved
    tags = client.get_model_version("medsam2", versions[0].version).tags
    assert tags["onnx_export"] == res["logged"]["artifact_uri"] and tags["onnx_export_quantized"] == "none"
    shutil.rmtree(tmp_path / "onnx")  # predicting from the registry needs no local copy

    img = sorted((sample_data / "kvasir-seg" / "images").glob("*.jpg"))[0]

    def predict_onnx(model: str) -> subprocess.CompletedProcess:
        return _cli("predict", str(img), "--model", model, "--box", "40,30,300,250", "--engine", "onnx",
                    "--out", str(tmp_path / "pred"), "--json")

    ok = predict_onnx("models:/medsam2@champion")
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert json.loads(ok.stdout.strip().splitlines()[-1])["outputs"][0]["status"] == "ok"

    # version 2 has no export of its own: said so, with the command that makes one
    v2 = f"models:/medsam2/{versions[1].version}"
    missing = predict_onnx(v2)
    assert missing.returncode == 3 and "no ONNX export is logged" in missing.stderr
    assert "medsam2 export --model" in missing.stderr and "Traceback" not in missing.stderr
    # an export tag copied onto another version does not pass for that version's export
    client.set_model_version_tag("medsam2", versions[1].version, "onnx_export", tags["onnx_export"])
    wrong = predict_onnx(v2)
    assert wrong.returncode == 3 and "does not match the model" in wrong.stderr, wrong.stderr[-2000:]
