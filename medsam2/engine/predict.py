"""Inference on original-resolution images: prompts in, masks out, at the image's own size.

``predict(model, images, boxes=..., points=..., point_labels=...)`` takes uint8 (H,W,3) images of any size
and prompts in each image's own pixel coordinates, runs the model at S×S (SAM2's square resize, or with
``model.box_crop`` the window around each box) and returns masks resized back to (H,W). The ``medsam2
predict`` CLI and the MLflow pyfunc both call it.

Logits are resampled to the image **once** (bilinear, as ``SAM2ImagePredictor`` does): with SAM2's own decoder
(``model.decoder: sam2``) the low-resolution (S/4) mask logits go straight to (H,W), not S/4 → S → (H,W); a box
prior (``model.box_prior``), defined on the S×S grid, is resampled once beside them and added. The ``multiscale``
and ``prompt_free`` decoders already predict at S (their refiner works at full model resolution), so their S×S
logits are the ones resampled. With ``model.box_crop`` the target of that one resampling is the crop window,
which :func:`~medsam2.data.crops.paste_logits` then places in the image (its own resize is then the identity).
"""

from __future__ import annotations

import contextlib
import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medsam2.data.crops import box_to_crop, crop_pair, crop_window, paste_logits
from medsam2.data.dataset import resize_pair
from medsam2.engine.cpu_attention import ChunkedCpuAttention, chunked_attention_pays
from medsam2.engine.runtime import (
    InferenceCompiled,
    autocast,
    bf16_twin,
    cpu_bf16_active,
    encoder_twin,
    inference_precision,
    int8_twin,
)
from medsam2.metrics import batch_dice
from medsam2.model.decoders.stock import StockDecoder, run_sam_decoder
from medsam2.model.segmenter import Segmenter, normalize


@dataclass
class Prediction:
    mask: np.ndarray
    """(H,W) bool, probability > 0.5."""
    prob: np.ndarray
    """(H,W) float32 foreground probability in [0,1]."""
    iou_pred: float
    """SAM's predicted IoU of the mask, in [0,1]."""
    flip_agreement: float | None = None
    """Dice in [0,1] between the masks of the image and of its mirror image (flipped back), on the model's S×S
    (or crop) logits, both empty = 1; None unless ``predict(agreement=True)`` or ``model.tta_flip``."""
    stability: float | None = None
    """SAM's stability score in [0,1] (:func:`stability_score` of the logits at the image's size); every
    :func:`predict` sets it."""


STABILITY_OFFSET = 1.0
"""The logit offset of :func:`stability_score`: SAM's automatic mask generator's default
(``stability_score_offset``)."""


def stability_score(logits: torch.Tensor, offset: float = STABILITY_OFFSET) -> float:
    """SAM's stability score of one mask's logits (any shape): the IoU of the masks at logit > +``offset`` and
    at logit > −``offset`` (the first lies inside the second, so it is their area ratio), in [0, 1]; 1 when
    both are empty. A mask whose edge moves when the threshold does is unstable: a low score."""
    inner = int((logits > offset).sum())
    outer = int((logits > -offset).sum())
    return 1.0 if outer == 0 else inner / outer


def _scale(xy: np.ndarray, hw: tuple[int, int], size: int) -> np.ndarray:
    """Scale x,y pairs (…,2) from an (H,W) image to S×S model input coordinates."""
    return xy * np.array([size / hw[1], size / hw[0]], np.float32)


def _flip_prompts(kw: dict[str, torch.Tensor], size: int) -> dict[str, torch.Tensor]:
    """Prompts of a left-right mirrored S×S input: x → S − x (box corners swap so that x0 < x1)."""
    out = dict(kw)
    if "boxes" in kw:
        b = kw["boxes"]
        out["boxes"] = torch.stack([size - b[:, 2], b[:, 1], size - b[:, 0], b[:, 3]], 1)
    if "points" in kw:
        p = kw["points"].clone()
        p[..., 0] = size - p[..., 0]
        out["points"] = p
    return out


def decode_features(model: Segmenter, feats: dict, x: torch.Tensor, kw: dict[str, torch.Tensor]
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The model's output at its own resolution from :meth:`Segmenter.encode`'s features, before any resampling
    to the image (the ONNX decoder graph of :mod:`medsam2.engine.export` is this function).

    Returns ``(logits (B,1,s,s), iou_pred (B,1), prior (B,1,S,S) or None)``: for SAM2's stock decoder the
    low-resolution logits (s = S/4) and the box prior's log-odds apart (``model(x)`` would be
    ``upsample_S(logits) + prior``); for the other decoders ``model(x)``'s logits (s = S) and None.
    """
    if not isinstance(model.decoder, StockDecoder):
        res = model.decode(feats, x, **kw)
        return res["logits"], res["iou_pred"], None
    sparse, dense = model.prompt_embeddings(x.shape[0], x.device, kw.get("boxes"), kw.get("points"),
                                            kw.get("point_labels"))
    low_res, iou_pred = run_sam_decoder(model.sam, feats, sparse, dense)
    prior = model.prior.fn(kw["boxes"], model.image_size) if model.prior is not None else None
    return low_res, iou_pred, prior


class _Encode(nn.Module):
    """``model.encode`` as a module's forward (what :class:`InferenceCompiled` compiles)."""

    def __init__(self, model: Segmenter) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> dict:
        return self.model.encode(x)


class TorchEngine:
    """A :class:`Segmenter` seen as an inference engine: ``encode(x) -> feats`` and ``decode(feats, x, kw)``
    (:func:`decode_features`). :class:`~medsam2.engine.export.OnnxEngine` has the same interface.

    Under bf16 autocast on CPU the encoder runs on the model's bf16 twin
    (:func:`~medsam2.engine.runtime.bf16_twin`: bf16 weights, no autocast), with
    :class:`~medsam2.engine.cpu_attention.ChunkedCpuAttention` where it pays (CPUs without AMX,
    :func:`~medsam2.engine.cpu_attention.chunked_attention_pays`): on 2 EPYC cores 1.17 s against autocast's
    1.48 s per 1024 px image end to end (hiera-t, same process, 2026-12-03). In fp32 on CPU it runs the fp32
    :func:`~medsam2.engine.runtime.encoder_twin` (the model's own weights; channels-last convolutions, no
    recomputed positions). The decoder stays fp32 under autocast (its prompt coordinates would lose up to 4 px
    in bf16 at 1024). ``compile=True``: the encoder runs ``torch.compile``d
    (:class:`~medsam2.engine.runtime.InferenceCompiled`, eager where compiling fails)."""

    name = "torch"

    def __init__(self, model: Segmenter, *, compile: bool = False) -> None:
        self.model = model
        self.cfg = model.cfg
        self.image_size = model.image_size
        self.device = next(model.parameters()).device
        self.compile = compile
        self.compiled: dict[str, InferenceCompiled] = {}
        """By precision (``fp32``/``bf16``) once used: each has ``compile_s`` and ``error``. ``int8`` runs eager
        (its Linears choose int8 or float by timing, :class:`~medsam2.engine.cpu_int8.Int8Linear`)."""
        self.reads_image = not isinstance(model.decoder, StockDecoder)
        """Whether :meth:`decode` reads the image (the decoders that refine at full resolution), or only its
        batch size and device (SAM2's own)."""

    def encode(self, x: torch.Tensor, precision: str = "fp32") -> dict:
        """(B,3,S,S) normalised float32 → features (:meth:`Segmenter.encode`). ``precision`` ``int8`` on CPU:
        the int8 twin (:func:`~medsam2.engine.runtime.int8_twin`); bf16 and fp32 follow the autocast state."""
        bf16 = cpu_bf16_active(x)
        cpu_fp32 = x.device.type == "cpu" and not torch.is_autocast_enabled("cpu")
        int8 = cpu_fp32 and precision == "int8"
        net = (bf16_twin(self.model) if bf16 else int8_twin(self.model) if int8
               else encoder_twin(self.model) if cpu_fp32 else self.model)
        run = net.encode
        if self.compile and not int8:  # the int8 twin's Linears time their own paths: nothing for inductor
            key = "bf16" if bf16 else "fp32"
            if key not in self.compiled or self.compiled[key].module.model is not net:
                self.compiled[key] = InferenceCompiled(_Encode(net))
            run = self.compiled[key]
        dtype = next(net.parameters()).dtype if int8 else torch.bfloat16 if bf16 else x.dtype
        if dtype != torch.bfloat16:
            return run(x.to(dtype))
        attention = ChunkedCpuAttention() if chunked_attention_pays() else contextlib.nullcontext()
        with torch.autocast("cpu", enabled=False), attention:
            return run(x.to(torch.bfloat16))

    def decode(self, feats: dict, x: torch.Tensor, kw: dict[str, torch.Tensor]):
        return decode_features(self.model, feats, x, kw)


class FeatureCache:
    """Image-encoder features by model input, so that more prompts on one image cost a decoder pass only.

    Keyed by a digest of the (S,S,3) uint8 model input (the resized image, or the crop window with
    ``model.box_crop``), the flip of test-time augmentation and the precision the features were computed in;
    holds at most ``size`` inputs (least recently used out). At 1024 px one entry is ~16 MB (hiera-t:
    (256,64,64) + (32,256,256) + (64,128,128) float32)."""

    def __init__(self, size: int = 8) -> None:
        self.size = size
        self._store: OrderedDict[tuple[bytes, bool, str], dict] = OrderedDict()
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(image_u8: np.ndarray, flip: bool, precision: str) -> tuple[bytes, bool, str]:
        # sha256: 2.6 ms for a 1024 px input on 2 cores with SHA extensions, against 6.8 for blake2b
        return hashlib.sha256(np.ascontiguousarray(image_u8).data).digest(), flip, precision

    def get(self, key: tuple[bytes, bool, str]) -> dict | None:
        if key in self._store:
            self._store.move_to_end(key)
            self.hits += 1
            return self._store[key]
        self.misses += 1
        return None

    def put(self, key: tuple[bytes, bool, str], feats: dict) -> None:
        self._store[key] = feats
        self._store.move_to_end(key)
        while len(self._store) > self.size:
            self._store.popitem(last=False)


def _one_feats(feats: dict, j: int) -> dict:
    """Image j of batched features, kept batched (batch 1), dense and in the layout the engine made them (the
    encoder twins make channels-last maps, which SAM2's decoder reads without strided passes on CPU,
    :mod:`medsam2.model.cpu_layout`): the same layout alone as inside a batch, since bf16 kernels round
    differently by layout and a mask must not depend on what it was batched with. A batch of one is returned as
    it is; image j of a larger batch is a copy, so a cache entry does not hold the whole batch."""
    def one(t: torch.Tensor) -> torch.Tensor:
        if t.shape[0] == 1 and (t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last)):
            return t
        return t[j:j + 1].clone(memory_format=torch.preserve_format)

    return {"image_embed": one(feats["image_embed"]), "high_res": [one(h) for h in feats["high_res"]]}


def _cat_feats(items: list[dict]) -> dict:
    """Batch per-image features; one image's are returned as they are (a one-tensor ``cat`` still copies its
    ~12 MB at 1024 px: 10 ms of an 85 ms extra prompt on 2 cores)."""
    if len(items) == 1:
        return items[0]
    return {"image_embed": torch.cat([f["image_embed"] for f in items]),
            "high_res": [torch.cat(level) for level in zip(*(f["high_res"] for f in items), strict=True)]}


def _encode_cached(engine, model_input: _ModelInput, flip: bool, precision: str, cache: FeatureCache) -> dict:
    """``engine.encode`` of the batch ``model_input`` holds (mirrored if ``flip``), running the encoder only on
    inputs not in ``cache`` (an input repeated in the batch is encoded once); ``model_input(rows, flip)`` makes
    the encoder's (b,3,S,S) input of those rows."""
    keys = [cache.key(u8.numpy(), flip, precision) for u8 in model_input.u8]
    found = {k: f for k in set(keys) if (f := cache.get(k)) is not None}
    todo = list(dict.fromkeys(k for k in keys if k not in found))
    first = {k: keys.index(k) for k in todo}
    # on CPU one image at a time: on 2 cores (hiera-t @1024) a batched encoder ran a batch of 6 at 0.285 img/s
    # against 0.404 one by one (the first cpu_infer run of 20261202, before this change); with it, 0.458 vs
    # 0.454 (benchmarks/results/cpu-infer-20261202.json). A GPU takes the batch at once
    step = 1 if model_input.device.type == "cpu" else max(1, len(todo))
    for s in range(0, len(todo), step):
        chunk = todo[s:s + step]
        feats = engine.encode(model_input([first[k] for k in chunk], flip), precision)
        for j, k in enumerate(chunk):
            found[k] = _one_feats(feats, j)
            cache.put(k, found[k])
    return _cat_feats([found[k] for k in keys])


class _ModelInput:
    """``model_input(rows, flip)``: the SAM-normalised (b,3,S,S) float32 input of those rows (None: all) of the
    (B,S,S,3) uint8 ``batch_u8``, mirrored if ``flip``. Made only when the encoder runs or the decoder reads the
    image: with cached features and SAM2's own decoder nothing needs it (normalising a 1024 px input took ~12 ms
    of a 77 ms extra prompt on 2 cores, 2026-12-03)."""

    def __init__(self, batch_u8: np.ndarray, device: torch.device) -> None:
        self.u8 = torch.from_numpy(batch_u8)
        self.device = device

    def __call__(self, rows: list[int] | None = None, flip: bool = False) -> torch.Tensor:
        t = self.u8 if rows is None else self.u8[rows]
        x = normalize(t.to(self.device).permute(0, 3, 1, 2).float() / 255.0)
        return x.flip(-1) if flip else x

    def for_decoder(self, engine, flip: bool) -> torch.Tensor:
        """What ``engine.decode`` reads as the image: the model input for the decoders that refine at full
        resolution (``engine.reads_image``); for SAM2's own decoder, which reads only the batch size and the
        device, a (B,3,1,1) zero stand-in (as the ONNX decoder graph makes for itself)."""
        if engine.reads_image:
            return self(None, flip)
        return torch.zeros(len(self.u8), 3, 1, 1, device=self.device)


def _resample(logits: torch.Tensor, prior: torch.Tensor | None, hw: tuple[int, int]) -> torch.Tensor:
    """(1,1,s,s) logits [+ (1,1,S,S) prior] → (1,1,H,W) float32 logits, each resampled once (bilinear)."""
    out = F.interpolate(logits.float(), size=hw, mode="bilinear", align_corners=False)
    if prior is not None:
        out = out + F.interpolate(prior.float(), size=hw, mode="bilinear", align_corners=False)
    return out


def _agreement(logits: torch.Tensor, prior: torch.Tensor | None, f_logits: torch.Tensor,
               f_prior: torch.Tensor | None) -> list[float]:
    """Per sample, Dice of the masks (logit > 0) of (B,1,h,w) ``logits`` and ``f_logits`` (the mirror's,
    flipped back), each with its (B,1,S,S) box prior added at the prior's size; both empty = 1."""
    def mask(lg: torch.Tensor, pr: torch.Tensor | None) -> torch.Tensor:
        if pr is not None:
            lg = F.interpolate(lg.float(), size=pr.shape[-2:], mode="bilinear", align_corners=False) + pr.float()
        return lg.float() > 0

    return [float(d) for d in batch_dice(mask(logits, prior).float(), mask(f_logits, f_prior), from_logits=False)]


@torch.no_grad()
def predict(
    model,
    images: Sequence[np.ndarray],
    boxes: Sequence[np.ndarray | None] | None = None,
    points: Sequence[np.ndarray | None] | None = None,
    point_labels: Sequence[np.ndarray | None] | None = None,
    *,
    precision: str = "auto",
    batch_size: int = 8,
    cache: FeatureCache | None = None,
    agreement: bool = False,
) -> list[Prediction]:
    """Segment ``images`` (each (H,W,3) uint8 RGB) with the model's prompt mode.

    ``model``: a :class:`Segmenter`, or an engine with its interface (:class:`TorchEngine`,
    :class:`~medsam2.engine.export.OnnxEngine`). ``boxes[i]``: (4,) x0,y0,x1,y1 in image i's pixels (prompt
    ``box``). ``points[i]``: (N,2) x,y and ``point_labels[i]``: (N,) 1/0 (prompt ``points``). Prompt-free models
    ignore prompts. ``precision``: ``auto`` (:func:`~medsam2.engine.runtime.inference_precision`: bf16 on CUDA
    and on CPUs with native bf16, else fp32), ``fp32``, ``bf16`` or ``int8`` (on CPU the bf16 encoder twin
    with its Linears in int8 where that is faster, :func:`~medsam2.engine.runtime.int8_twin`; the decoder
    stays fp32). One image with several prompts is encoded once: pass it several times (its features are
    reused within the call); a ``cache``
    keeps them across calls.
    ``agreement``: also run the mirror image and report each mask's ``flip_agreement`` (a failure-flag input,
    :mod:`medsam2.eval.calibration`); the masks stay the unflipped image's unless ``model.tta_flip``.
    """
    engine = TorchEngine(model) if isinstance(model, Segmenter) else model
    cache = cache if cache is not None else FeatureCache(size=batch_size)
    device = engine.device
    size = engine.image_size
    mode = engine.cfg.prompt
    margin = engine.cfg.box_crop if mode == "box" else None
    # autocast for PyTorch only (an ONNX engine runs its own graphs' precision)
    precision = inference_precision(device, precision) if engine.name == "torch" else "fp32"
    out: list[Prediction] = []
    for start in range(0, len(images), batch_size):
        idx = range(start, min(len(images), start + batch_size))
        kw = {}
        windows: dict[int, np.ndarray] = {}
        if mode == "box":
            if boxes is None or any(boxes[i] is None for i in idx):
                raise ValueError("this model is box-prompted: give a box for every image")
            model_boxes = []
            for i in idx:
                box = np.asarray(boxes[i], np.float32).reshape(4)
                if margin is not None:
                    windows[i] = crop_window(box, margin, images[i].shape[:2])
                    model_boxes.append(box_to_crop(box, windows[i], size))
                else:
                    model_boxes.append(_scale(box.reshape(2, 2), images[i].shape[:2], size).reshape(4))
            kw["boxes"] = torch.from_numpy(np.stack(model_boxes)).to(device)
        elif mode == "points":
            if points is None or point_labels is None:
                raise ValueError("this model is point-prompted: give points and point_labels")
            kw["points"] = torch.from_numpy(
                np.stack([_scale(np.asarray(points[i], np.float32), images[i].shape[:2], size) for i in idx])
            ).to(device)
            kw["point_labels"] = torch.from_numpy(np.stack([np.asarray(point_labels[i]) for i in idx])).to(device)
        inputs_u8 = [crop_pair(images[i], None, windows[i], size)[0] if i in windows
                     else resize_pair(images[i], None, size)[0] for i in idx]
        model_input = _ModelInput(np.stack(inputs_u8), device)
        with autocast(device, precision):
            feats = _encode_cached(engine, model_input, False, precision, cache)
            logits, iou, prior = engine.decode(feats, model_input.for_decoder(engine, False), kw)
            agree = [None] * len(idx)
            if engine.cfg.tta_flip or agreement:  # the mirror image's logits, flipped back
                f_feats = _encode_cached(engine, model_input, True, precision, cache)
                f_logits, f_iou, f_prior = engine.decode(f_feats, model_input.for_decoder(engine, True),
                                                         _flip_prompts(kw, size))
                f_logits, f_prior = f_logits.flip(-1), None if f_prior is None else f_prior.flip(-1)
                agree = _agreement(logits, prior, f_logits, f_prior)
            if engine.cfg.tta_flip:  # mean of the logits of the image and its mirror image
                logits, iou = (logits + f_logits) / 2, (iou + f_iou) / 2
                prior = None if prior is None else (prior + f_prior) / 2
        logits, iou = logits.float(), iou.float()
        for j, i in enumerate(idx):
            h, w = images[i].shape[:2]
            pj = None if prior is None else prior[j:j + 1]
            if i in windows:  # resampled once to the window, pasted back there, background elsewhere
                x0, y0, x1, y1 = (int(v) for v in windows[i])
                full = paste_logits(_resample(logits[j:j + 1], pj, (y1 - y0, x1 - x0)), windows[i], (h, w))
            else:
                full = _resample(logits[j:j + 1], pj, (h, w))
            prob = torch.sigmoid(full)
            p = prob[0, 0].cpu().numpy()
            out.append(Prediction(mask=p > 0.5, prob=p, iou_pred=float(iou[j, 0]), flip_agreement=agree[j],
                                  stability=stability_score(full)))
    return out
