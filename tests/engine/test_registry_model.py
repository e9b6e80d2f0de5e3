"""A registered model is self-contained (code + base weights travel with it), and one of our models can be the
base weights (``model.checkpoint``) of a new one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from medsam2.config import ExperimentCfg, ModelCfg
from medsam2.engine.checkpoint import atomic_save, build_model, model_payload
from medsam2.model.backbone import CheckpointMismatchError, build_sam2_base

S = 64

# Loads the registered model where the medsam2 sources cannot be imported (editable-install finder and the repo
# dropped from the path): only the code logged with the model can serve it.
SERVE = r"""
import importlib.util, json, sys
sys.meta_path = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
sys.path = [p for p in sys.path if p not in ("", sys.argv[3]) and not p.startswith("__editable__")]
assert importlib.util.find_spec("medsam2") is None, "medsam2 is importable without the model's code"
import base64, io, mlflow, numpy as np
from PIL import Image
model = mlflow.pyfunc.load_model(sys.argv[1])
import medsam2
buf = io.BytesIO()
Image.fromarray(np.load(sys.argv[2])).save(buf, format="PNG")
out = model.predict([{"image": base64.b64encode(buf.getvalue()).decode(), "box": [8, 6, 50, 40]}])[0]
mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(out.mask)))) > 127
np.save(sys.argv[2] + ".mask.npy", mask.astype(np.uint8))
print(json.dumps({"medsam2": medsam2.__file__}))
"""


def _perturb(model: torch.nn.Module, seed: int = 0) -> None:
    """Move every trainable tensor, so a weight that is not carried over shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))


def _trained(tmp_path, adapter: str, checkpoint: str = "none"):
    cfg = ExperimentCfg(model=ModelCfg(image_size=S, adapter=adapter, checkpoint=checkpoint))
    model, base = build_model(cfg.model)
    _perturb(model)
    path = atomic_save(model_payload(model, cfg, base), tmp_path / f"{adapter}-final.pt")
    return model.eval(), path


def _sam_weights(model) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.sam.state_dict().items()}


@pytest.mark.slow  # a serving subprocess (imports torch, mlflow, sam2) and three loads of the registered model
def test_registered_model_serves_without_the_base_file_or_medsam2(tmp_path, tracking_env):
    """A checkpoint that holds only its trainable tensors is logged with its base file; the registered model
    then loads (pyfunc, in a process that has only the dependencies) after the original base is deleted, serves
    the same masks, fails clearly when the base copy is not the one trained on, and is a base for a new model."""
    import mlflow

    from medsam2 import tracking
    from medsam2.engine.predict import predict

    base_file = tmp_path / "sam2_base.pt"
    torch.save({"model": build_sam2_base("hiera_t", "2.1", S).state_dict()}, base_file)
    model, ckpt = _trained(tmp_path, "decoder_only", str(base_file))
    assert not torch.load(ckpt, weights_only=False)["full"]  # only the trainable tensors: it needs base_file

    cfg = ExperimentCfg(model=ModelCfg(image_size=S))
    tracking.setup(cfg)
    with mlflow.start_run():
        uri = tracking.log_model(ckpt)
    mv = mlflow.register_model(uri, "medsam2")
    tracking._client().set_registered_model_alias("medsam2", "champion", mv.version)
    img = np.random.default_rng(0).integers(0, 255, (48, 60, 3), dtype=np.uint8)
    np.save(tmp_path / "img.npy", img)
    expected = predict(model, [img], boxes=[[8, 6, 50, 40]])[0].mask.astype(np.uint8)
    base_file.unlink()  # the training machine's base weights are gone

    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking.tracking_uri()}
    repo = str(Path(tracking.__file__).resolve().parents[1])
    out = subprocess.run([sys.executable, "-c", SERVE, "models:/medsam2@champion", str(tmp_path / "img.npy"), repo],
                         capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    served_from = json.loads(out.stdout.strip().splitlines()[-1])["medsam2"]
    assert repo not in served_from  # the model's own code copy
    np.testing.assert_array_equal(np.load(tmp_path / "img.npy.mask.npy"), expected)


    # one of our models as model.checkpoint: its SAM2 part (trained prompt encoder / mask decoder included)
    new, base = build_model(ModelCfg(image_size=S, checkpoint="models:/medsam2@champion"))
    assert base.kind == "medsam2" and not base.reloadable
    for k, v in _sam_weights(model).items():
        assert torch.equal(v, new.sam.state_dict()[k]), k

    # a base copy that is not the file the model was trained on is refused, naming both hashes
    local = mlflow.artifacts.download_artifacts("models:/medsam2@champion", dst_path=str(tmp_path / "dl"))
    copy = Path(local) / "artifacts" / base_file.name
    assert copy.is_file()
    torch.manual_seed(1)
    torch.save({"model": build_sam2_base("hiera_t", "2.1", S).state_dict()}, copy)
    with pytest.raises(CheckpointMismatchError, match="sha256") as err:
        mlflow.pyfunc.load_model(local)
    assert "not the weights it was trained on" in str(err.value)


def test_our_model_as_base_weights(tmp_path, caplog):
    """``model.checkpoint`` = one of our ``final.pt``: LoRA is merged into the SAM2 weights (same image features
    as the LoRA model), trained SAM2 weights carry over, and the new checkpoint is full (self-contained)."""
    src, ckpt = _trained(tmp_path, "lora")
    cfg = ExperimentCfg(model=ModelCfg(image_size=S, adapter="decoder_only", checkpoint=str(ckpt)))
    new, base = build_model(cfg.model)
    assert base.kind == "medsam2" and base.source == str(ckpt) and len(base.sha256) == 64
    new.eval()
    x = torch.randn(1, 3, S, S)
    with torch.no_grad():
        a, b = src.encode(x), new.encode(x)
    torch.testing.assert_close(a["image_embed"], b["image_embed"], rtol=1e-4, atol=1e-4)
    for k, v in src.sam.sam_mask_decoder.state_dict().items():
        assert torch.equal(v, new.sam.sam_mask_decoder.state_dict()[k]), k
    assert model_payload(new, cfg, base)["full"]  # its checkpoint does not depend on the source file

    # bottleneck adapters cannot be folded into SAM2 weights: dropped, loudly
    src_b, ckpt_b = _trained(tmp_path, "bottleneck")
    with caplog.at_level("WARNING"):
        new_b, _ = build_model(ModelCfg(image_size=S, checkpoint=str(ckpt_b)))
    assert "DROPPED" in caplog.text
    torch.testing.assert_close(new_b.sam.sam_prompt_encoder.state_dict(), src_b.sam.sam_prompt_encoder.state_dict())

    # a training state (last.pt: Segmenter keys, no config) is named as such instead of a key-mismatch dump
    torch.save({"model": src.state_dict(), "step": 1}, tmp_path / "last.pt")
    with pytest.raises(CheckpointMismatchError, match="training state"):
        build_model(ModelCfg(image_size=S, checkpoint=str(tmp_path / "last.pt")))
    with pytest.raises(CheckpointMismatchError, match="model.backbone=hiera_t"):
        build_model(ModelCfg(image_size=S, backbone="hiera_s", checkpoint=str(ckpt)))
