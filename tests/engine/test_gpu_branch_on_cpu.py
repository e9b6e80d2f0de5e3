"""The branch a GPU user takes — bf16 autocast and ``torch.compile`` of the image encoder — run on CPU through
``train()`` and ``predict()``, so it is not code that only ever runs on a machine this project has not had.

``cpu_has_native_bf16`` is set to True here: whether the CPU has AVX-512 BF16 is a property of the host that a
test cannot produce, and on a host without it PyTorch emulates bf16 (slower, same numerics), which is enough to
run the branch."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from medsam2.config import ModelCfg
from medsam2.engine import runtime
from medsam2.engine.checkpoint import build_model
from medsam2.engine.predict import predict
from medsam2.engine.train import train
from medsam2.metrics import segmentation_metrics
from tests.conftest import tiny_cfg


@pytest.fixture
def native_bf16(monkeypatch):
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: True)


def test_predict_under_bf16_autocast_and_a_compiled_encoder(native_bf16):
    model, _ = build_model(ModelCfg(image_size=64, prompt="box", box_mask=True))
    model.eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # off the init, so the masks are not all alike
        for p in model.sam.sam_mask_decoder.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    img = np.random.default_rng(0).integers(0, 255, (80, 100, 3), dtype=np.uint8)
    box = np.array([10, 8, 70, 60], np.float32)
    fp32 = predict(model, [img], boxes=[box], precision="fp32")[0]

    dtypes = []
    hook = model.sam.sam_mask_decoder.register_forward_hook(lambda m, i, o: dtypes.append(o[0].dtype))
    assert runtime.compile_encoder(model) is None  # inductor on CPU compiles the encoder
    bf16 = predict(model, [img], boxes=[box], precision="bf16")[0]
    hook.remove()
    assert dtypes and all(d == torch.bfloat16 for d in dtypes)  # the decoder ran under bf16 autocast
    assert bf16.prob.dtype == np.float32 and bf16.mask.shape == (80, 100)
    assert segmentation_metrics(bf16.mask, fp32.mask)["dice"] > 0.9  # bf16 changes few pixels


@pytest.mark.slow  # compiling the encoder's forward and backward (~2 min on 2 cores)
def test_train_in_bf16_with_a_compiled_encoder_records_what_ran(native_bf16, kvasir_workdir, tmp_path,
                                                                 tracking_env):
    import mlflow

    from medsam2 import tracking

    cfg = tiny_cfg(kvasir_workdir, tmp_path / "run", "train.precision=bf16", "train.compile=true",
                   "train.max_steps=2")
    tracking.setup(cfg)
    with mlflow.start_run() as run:
        res = train(cfg, callbacks=[tracking.MlflowCallback()])
    assert res.steps == 2 and res.precision == "bf16" and res.compiled
    assert math.isfinite(res.metrics["final_loss"])
    tags = mlflow.get_run(run.info.run_id).data.tags
    assert tags["precision_effective"] == "bf16" and tags["encoder_compiled"] == "true"


def test_mlflow_records_the_fp32_fallback_of_bf16(monkeypatch, kvasir_workdir, tmp_path, tracking_env):
    """On a CPU without native bf16 the run says it ran fp32, although the config asked for bf16."""
    import mlflow

    from medsam2 import tracking

    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: False)
    cfg = tiny_cfg(kvasir_workdir, tmp_path / "run", "train.precision=bf16", "train.max_steps=1")
    tracking.setup(cfg)
    with mlflow.start_run() as run:
        res = train(cfg, callbacks=[tracking.MlflowCallback()])
    assert res.precision == "fp32" and not res.compiled
    tags = mlflow.get_run(run.info.run_id).data.tags
    assert tags["precision_effective"] == "fp32" and tags["encoder_compiled"] == "false"
