"""ONNX export of a trained model, and the ONNX Runtime engine that predicts with it.

An export directory holds two graphs and a manifest:

- ``encoder.onnx``: ``image`` (B,3,S,S) float32, SAM-normalised → ``image_embed`` (B,256,S/16,S/16),
  ``high_res_0`` (B,32,S/4,S/4), ``high_res_1`` (B,64,S/8,S/8): :meth:`Segmenter.encode`;
- ``decoder.onnx``: those features + the prompt of the model's mode (``boxes`` (B,4) x0,y0,x1,y1 in [0,S], or
  ``points`` (B,N,2) + ``point_labels`` (B,N) int64, or nothing) [+ ``image`` for the decoders that refine at
  full resolution] → ``logits`` (B,1,s,s), ``iou_pred`` (B,1) [+ ``prior`` (B,1,S,S)]: exactly
  :func:`~medsam2.engine.predict.decode_features`, so :func:`~medsam2.engine.predict.predict` runs either engine
  with the same pre- and post-processing (crops, flip TTA, one resampling to the image);
- with ``quantize="int8"`` also ``encoder.int8.onnx`` / ``decoder.int8.onnx`` (ONNX Runtime dynamic int8
  quantisation of the MatMul/Gemm weights);
- ``export.json``: the training config, the source model and checkpoint sha256, each file's sha256, the graphs'
  inputs and outputs, and the parity measured at export time (ONNX Runtime against PyTorch fp32).

Batch (and the number of points) are dynamic axes. :class:`OnnxEngine` refuses a directory that is not an
export, lacks a file, or whose files changed since the export, with the reason and what to do.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medsam2.config import ExperimentCfg, ModelCfg
from medsam2.engine.predict import decode_features
from medsam2.errors import InputDataError
from medsam2.hashing import file_sha256
from medsam2.model.decoders.stock import StockDecoder
from medsam2.model.segmenter import Segmenter

MANIFEST = "export.json"
FORMAT = "medsam2-onnx"
VERSION = 1
OPSET = 18
FEATURES = ("image_embed", "high_res_0", "high_res_1")
PARITY_TOL = 1e-3
"""Max |logit| difference, ONNX Runtime fp32 vs PyTorch fp32, that an export must meet."""


class _Encoder(nn.Module):
    def __init__(self, model: Segmenter) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor):
        f = self.model.encode(image)
        return f["image_embed"], f["high_res"][0], f["high_res"][1]


class _Decoder(nn.Module):
    """``decode_features`` with its inputs as positional tensors, in :func:`decoder_inputs` order."""

    def __init__(self, model: Segmenter, names: list[str]) -> None:
        super().__init__()
        self.model = model
        self.names = names

    def forward(self, *args: torch.Tensor):
        a = dict(zip(self.names, args, strict=True))
        feats = {"image_embed": a["image_embed"], "high_res": [a["high_res_0"], a["high_res_1"]]}
        image = a.get("image")
        if image is None:  # the stock decoder reads only the batch size and the device of the image
            image = a["image_embed"].new_zeros(a["image_embed"].shape[0], 3, 1, 1)
        kw = {k: a[k] for k in ("boxes", "points", "point_labels") if k in a}
        logits, iou, prior = decode_features(self.model, feats, image, kw)
        return (logits, iou) if prior is None else (logits, iou, prior)


def decoder_inputs(model: Segmenter) -> list[str]:
    """The decoder graph's inputs: the features, the image for the decoders that read it (every one but SAM2's
    own, the same test as ``decode_features``), and the prompt of the model's mode."""
    names = list(FEATURES) + ([] if isinstance(model.decoder, StockDecoder) else ["image"])
    return names + {"box": ["boxes"], "points": ["points", "point_labels"]}.get(model.cfg.prompt, [])


def _example(model: Segmenter, batch: int, seed: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A deterministic (B,3,S,S) input and prompts of the model's mode, in model-input pixels."""
    g = torch.Generator().manual_seed(seed)
    s = model.image_size
    x = torch.randn(batch, 3, s, s, generator=g)
    lo = torch.rand(batch, 2, generator=g) * s * 0.4
    hi = lo + s * (0.2 + 0.35 * torch.rand(batch, 2, generator=g))
    kw = {}
    if model.cfg.prompt == "box":
        kw["boxes"] = torch.cat([lo, hi], 1)
    elif model.cfg.prompt == "points":
        kw["points"] = ((lo + hi) / 2).unsqueeze(1).repeat(1, 2, 1)
        kw["point_labels"] = torch.tensor([[1, 0]], dtype=torch.int64).repeat(batch, 1)
    return x, kw


def _export(module: nn.Module, args: tuple, path: Path, inputs: list[str], outputs: list[str],
            dynamic: dict[str, dict[int, Any]]) -> None:
    import warnings

    shapes = tuple(dynamic.get(n) for n in inputs)
    if isinstance(module, _Decoder):  # forward(*args): the shapes of the one variadic argument
        shapes = (shapes,)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(module, args, dynamo=True, input_names=inputs, output_names=outputs,
                                 dynamic_shapes=shapes, opset_version=OPSET, verbose=False)
    prog.save(str(path))


def _session(path: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    threads = int(os.environ.get("MEDSAM2_ORT_THREADS", "0"))
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def export_onnx(model: Segmenter, cfg: ExperimentCfg, out: str | Path, *, source: str, quantize: str | None = None
                ) -> dict[str, Any]:
    """Export ``model`` (trained with ``cfg``, loaded from ``source``) to ``out``; returns the manifest.

    Written into a temporary sibling first and moved into place, so ``out`` is either the complete export or
    untouched. ``out`` must not exist, be empty, or hold an earlier export (which is replaced). ``model`` is put
    in eval mode, fp32, on the CPU, in place."""
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not (out / MANIFEST).is_file():
        raise InputDataError(f"{out} exists and is not an ONNX export: refusing to write into it",
                             "give a new or empty --out directory")
    if quantize not in (None, "int8"):
        raise InputDataError(f"--quantize {quantize!r} is not supported", "use --quantize int8 or leave it out")
    model = model.float().eval().cpu()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        t0 = time.perf_counter()
        manifest = _write_graphs(model, tmp)
        manifest["export_s"] = round(time.perf_counter() - t0, 2)
        if quantize == "int8":
            manifest["quantized"] = _quantize(tmp)
        manifest.update(format=FORMAT, version=VERSION, source=source, config=cfg.model_dump(mode="json"),
                        torch=torch.__version__, created=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        manifest["files"] = {p.name: file_sha256(p) for p in sorted(tmp.glob("*.onnx"))}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def _write_graphs(model: Segmenter, d: Path) -> dict[str, Any]:
    import onnxruntime as ort

    mcfg = model.cfg
    batch = torch.export.Dim("batch", min=1, max=256)
    x, kw = _example(model, 2)
    _export(_Encoder(model), (x,), d / "encoder.onnx", ["image"], list(FEATURES), {"image": {0: batch}})
    with torch.no_grad():
        feats = model.encode(x)
        ref = decode_features(model, feats, x, kw)
    names = decoder_inputs(model)
    values = {"image_embed": feats["image_embed"], "high_res_0": feats["high_res"][0],
              "high_res_1": feats["high_res"][1], "image": x, **kw}
    outputs = ["logits", "iou_pred"] + (["prior"] if ref[2] is not None else [])
    dynamic = {n: {0: batch} for n in names}
    if "points" in names:
        npts = torch.export.Dim("points", min=1, max=64)
        dynamic["points"] = {0: batch, 1: npts}
        dynamic["point_labels"] = {0: batch, 1: npts}
    _export(_Decoder(model, names), tuple(values[n] for n in names), d / "decoder.onnx", names, outputs, dynamic)
    # parity on a batch size other than the traced one: the batch axis must really be dynamic
    engine = OnnxEngine.from_graphs(d, mcfg, int(model.image_size), names, outputs)
    x3, kw3 = _example(model, 3, seed=1)
    with torch.no_grad():
        want = decode_features(model, model.encode(x3), x3, kw3)
    got = engine.decode(engine.encode(x3), x3, kw3)
    parity = {"batch": 3, "logits_max_abs": float((got[0] - want[0]).abs().max()),
              "iou_max_abs": float((got[1] - want[1]).abs().max()), "tolerance": PARITY_TOL}
    if parity["logits_max_abs"] > PARITY_TOL:
        raise RuntimeError(f"ONNX export does not reproduce the model: logits differ by up to "
                           f"{parity['logits_max_abs']:.2e} (> {PARITY_TOL:g})")
    return {"image_size": int(model.image_size), "prompt": mcfg.prompt, "decoder": mcfg.decoder, "opset": OPSET,
            "onnxruntime": ort.__version__, "encoder": {"inputs": ["image"], "outputs": list(FEATURES)},
            "decoder_graph": {"inputs": names, "outputs": outputs}, "parity_fp32": parity}


ACTIVATION_MATMULS = {"encoder": True, "decoder": False}
"""Whether a graph's activation × activation MatMuls (attention's q·kᵀ and p·v) are quantised too, not only
those with a weight. In the encoder: 0.69 s against 0.77 s per 1024 px image (hiera-t, 2 cores, 2026-12-03;
fp32 1.03 s), with the same feature error (relative L2 0.022 / 0.005 / 0.013 for the three maps either way). The
decoder's attention is small and decides the mask's edge, so it keeps them fp32."""


def _quantize(d: Path) -> dict[str, Any]:
    """Dynamic int8 of both graphs: per-channel int8 weights of MatMul/Gemm, activations quantised at run time
    (and, per :data:`ACTIVATION_MATMULS`, the attention matmuls of the encoder). Static (calibrated QDQ)
    quantisation was slower (1.24 s against 0.99 s in the same run) and less exact (relative L2 0.03)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    for name in ("encoder", "decoder"):
        pre = d / f"{name}.pre.onnx"
        quant_pre_process(str(d / f"{name}.onnx"), str(pre), skip_symbolic_shape=True)
        quantize_dynamic(str(pre), str(d / f"{name}.int8.onnx"), weight_type=QuantType.QInt8, per_channel=True,
                         op_types_to_quantize=["MatMul", "Gemm"],
                         extra_options={"MatMulConstBOnly": not ACTIVATION_MATMULS[name]})
        pre.unlink()
    return {"kind": "int8", "method": "onnxruntime.quantize_dynamic", "ops": ["MatMul", "Gemm"],
            "activation_matmuls": [g for g, on in ACTIVATION_MATMULS.items() if on]}


class OnnxEngine:
    """:func:`~medsam2.engine.predict.predict`'s engine interface over an export directory (ONNX Runtime, CPU).

    ``precision``: ``fp32`` (default) or ``int8`` (the quantised graphs, when the export has them)."""

    name = "onnx"

    def __init__(self, path: str | Path, precision: str = "fp32") -> None:
        d = Path(path)
        manifest = read_manifest(d)
        if precision not in ("fp32", "int8"):
            raise InputDataError(f"ONNX precision {precision!r} is not one of fp32, int8")
        if precision == "int8" and not manifest.get("quantized"):
            raise InputDataError(f"{d} has no int8 graphs", f"export with --quantize int8: medsam2 export --model "
                                 f"{manifest.get('source', 'MODEL')} --format onnx --quantize int8 --out {d}")
        cfg = ExperimentCfg.model_validate(manifest["config"])
        graphs = manifest["decoder_graph"]
        self._setup(d, cfg.model, manifest["image_size"], graphs["inputs"], graphs["outputs"], precision)
        self.manifest = manifest

    @classmethod
    def from_graphs(cls, d: Path, cfg: ModelCfg, size: int, inputs: list[str], outputs: list[str],
                    precision: str = "fp32") -> OnnxEngine:
        """The engine over graphs that have no manifest yet (the export's own parity check)."""
        engine = cls.__new__(cls)
        engine._setup(d, cfg, size, inputs, outputs, precision)
        return engine

    def _setup(self, d: Path, cfg: ModelCfg, size: int, inputs: list[str], outputs: list[str], precision: str
               ) -> None:
        suffix = ".int8.onnx" if precision == "int8" else ".onnx"
        self.cfg, self.image_size, self.inputs, self.outputs = cfg, size, inputs, outputs
        self.reads_image = "image" in inputs
        self.device = torch.device("cpu")
        self._enc = _session(d / f"encoder{suffix}")
        self._dec = _session(d / f"decoder{suffix}")

    def encode(self, x: torch.Tensor, precision: str = "fp32") -> dict:
        """(B,3,S,S) → features; ``precision`` is ignored (the graphs loaded are this engine's precision)."""
        e, h0, h1 = self._enc.run(list(FEATURES), {"image": x.float().cpu().numpy()})
        return {"image_embed": torch.from_numpy(e), "high_res": [torch.from_numpy(h0), torch.from_numpy(h1)]}

    def decode(self, feats: dict, x: torch.Tensor, kw: dict[str, torch.Tensor]):
        values = {"image_embed": feats["image_embed"], "high_res_0": feats["high_res"][0],
                  "high_res_1": feats["high_res"][1], "image": x, **kw}
        feed = {n: values[n].cpu().numpy().astype(np.int64 if n == "point_labels" else np.float32)
                for n in self.inputs}
        res = [torch.from_numpy(r) for r in self._dec.run(self.outputs, feed)]
        return res[0], res[1], res[2] if len(res) > 2 else None


def read_manifest(d: Path) -> dict[str, Any]:
    """An export directory's manifest, after checking that every graph it lists is there and unchanged."""
    how = "create one with: medsam2 export --model MODEL --format onnx --out DIR"
    if not d.is_dir():
        raise InputDataError(f"ONNX export {d} is not a directory", how)
    mf = d / MANIFEST
    if not mf.is_file():
        raise InputDataError(f"{d} is not a MedSAM2 ONNX export: it has no {MANIFEST}", how)
    try:
        manifest = json.loads(mf.read_text())
    except json.JSONDecodeError as e:
        raise InputDataError(f"{mf} is not valid JSON ({e.msg})", "re-export the model") from None
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise InputDataError(f"{mf} is not a {FORMAT} v{VERSION} manifest", "re-export with this medsam2 version")
    for name, sha in manifest.get("files", {}).items():
        f = d / name
        if not f.is_file():
            raise InputDataError(f"ONNX export {d} lacks {name}", "copy the whole export directory, or re-export")
        if file_sha256(f) != sha:
            raise InputDataError(f"{f} changed since the export (sha256 differs from {MANIFEST}): it does not "
                                 "match the exported model", "re-export the model into a new directory")
    for needed in ("encoder.onnx", "decoder.onnx"):
        if needed not in manifest.get("files", {}):
            raise InputDataError(f"{mf} lists no {needed}", "re-export the model")
    return manifest
